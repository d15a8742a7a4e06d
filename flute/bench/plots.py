"""PNGs of benchmark results (only when matplotlib is importable; the JSON is always written and
``python benchmarks/plot.py RESULT.json`` draws these later, anywhere).

- GPU sweep: ``<stem>_speedup.png`` (speedup over dense vs M, one panel per shape and dtype) and
  ``<stem>_roofline.png`` (% of the copy-bandwidth roofline vs M).
- End to end: ``<stem>_e2e.png`` (decode and prefill tokens/s).
- CPU benchmark: ``<stem>_cpu.png`` (per shape and thread count, milliseconds vs M for every
  kernel, cache-cold points; log-log).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from .shapes import all_shapes


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001
        return None


def _series(points, shape, dtype, metric):
    """``{label: (Ms, values)}`` for one shape and dtype."""
    out: Dict[str, tuple] = {}
    for p in points:
        if p["shape"] != shape or p["dtype"] != dtype or p.get(metric) is None:
            continue
        if p["kernel"] == "fp16" and metric == "speedup_vs_fp16":
            continue
        label = p["kernel"] if p["kernel"] == "fp16" else f"{p['kernel']} {p['bits']}b g{p['group_size']}"
        out.setdefault(label, ([], []))
        out[label][0].append(p["M"])
        out[label][1].append(p[metric])
    for k, (ms, vs) in out.items():
        order = sorted(range(len(ms)), key=ms.__getitem__)
        out[k] = ([ms[i] for i in order], [vs[i] for i in order])
    return out


_STYLE = {"flute": "-", "dequant_matmul": ":", "tinygemm": "--", "marlin": "-.", "fp16": "-"}
_COLOR = {2: "tab:red", 3: "tab:orange", 4: "tab:blue", None: "black"}


def plot_results(json_path: str, out_dir: Optional[str] = None) -> List[str]:
    """Draw the PNGs of one result file; returns the written paths (empty without matplotlib)."""
    plt = _plt()
    if plt is None:
        return []
    with open(json_path) as f:
        doc = json.load(f)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    stem = os.path.splitext(os.path.basename(json_path))[0]
    if doc.get("kind") == "cpu-kernels":
        return [p for p in [_plot_cpu(plt, doc, os.path.join(out_dir, f"{stem}_cpu.png"))] if p]
    written = []
    if doc.get("e2e"):
        written.append(_plot_e2e(plt, doc, os.path.join(out_dir, f"{stem}_e2e.png")))
    points = doc.get("points") or []
    if points:
        written += _plot_sweep(plt, doc, points, out_dir, stem)
    return written


def _plot_sweep(plt, doc, points, out_dir, stem) -> List[str]:
    order = {s.name: i for i, s in enumerate(all_shapes())}
    shapes = sorted({p["shape"] for p in points}, key=lambda s: (order.get(s, len(order)), s))
    dtypes = [d for d in ("fp16", "bf16") if any(p["dtype"] == d for p in points)]
    title = (f"{doc.get('device', '?')} | copy {doc.get('copy_bw_gbps', 0):.0f} GB/s | "
             f"commit {str(doc.get('commit', '?'))[:10]}")
    # Rows: (model and TP split, dtype); columns: the layer (qkv, o, gate_up, down, ...).
    prefixes = list(dict.fromkeys(s.split("/")[0] for s in shapes))
    layers = list(dict.fromkeys(s.split("/", 1)[-1] for s in shapes))
    panels = [(pre, dt) for pre in prefixes for dt in dtypes]
    written = []
    for metric, fname, ylabel in (("speedup_vs_fp16", "speedup", "speedup over dense"),
                                  ("roofline_pct", "roofline", "% of copy roofline")):
        nrow, ncol = len(panels), len(layers)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1.5, 2.5 * nrow), squeeze=False)
        handles = {}
        for r, (pre, dt) in enumerate(panels):
            for cidx, layer in enumerate(layers):
                ax = axes[r][cidx]
                shape = f"{pre}/{layer}"
                if shape not in shapes:
                    ax.set_visible(False)
                    continue
                for label, (ms, vs) in sorted(_series(points, shape, dt, metric).items()):
                    kernel = label.split()[0]
                    bits = None if kernel == "fp16" else int(label.split()[1][:-1])
                    if kernel in ("flute", "dequant_matmul", "fp16"):
                        color = _COLOR.get(bits if kernel != "fp16" else None)
                    else:
                        color = "tab:green" if kernel == "tinygemm" else "tab:purple"
                    (h,) = ax.plot(ms, vs, _STYLE.get(kernel, "-"), marker="o" if
                                   label.endswith("g128") or kernel == "fp16" else "x", ms=3,
                                   color=color, alpha=1.0 if kernel == "flute" else 0.7, label=label)
                    handles.setdefault(label, h)
                ax.set_xscale("log", base=2)
                if metric == "speedup_vs_fp16":
                    ax.axhline(1.0, color="grey", lw=0.8)
                ax.set_title(f"{shape} {dt}", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if r == nrow - 1:
                    ax.set_xlabel("M (tokens)", fontsize=8)
                if cidx == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
        if handles:
            labels = sorted(handles)
            fig.legend([handles[k] for k in labels], labels, loc="center right", fontsize=7)
        fig.suptitle(f"{ylabel} vs M | {title}", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.6 * ncol + 1.5), 0.97))
        path = os.path.join(out_dir, f"{stem}_{fname}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _plot_e2e(plt, doc, path):
    rows = doc["e2e"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows)]
    batches = sorted({r["batch"] for r in rows if r.get("decode_tok_s")})
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [next((r["decode_tok_s"] for r in rows if r["variant"] == v and r["batch"] == b
                    and r.get("decode_tok_s")), 0) for b in batches]
        axes[0].bar([j + i * width for j in range(len(batches))], ys, width, label=v)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(batches))])
    axes[0].set_xticklabels([f"batch {b}" for b in batches])
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend(fontsize=7)
    pre = [(r["variant"], r["prefill_tok_s"]) for r in rows if r.get("prefill_tok_s")]
    axes[1].bar([p[0] for p in pre], [p[1] for p in pre], color="tab:gray")
    axes[1].set_ylabel(f"prefill tokens/s ({doc.get('prefill_tokens', '?')} tokens)")
    fig.suptitle(f"{doc.get('model', '')} | {doc.get('device', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def cpu_label(p: Dict[str, object]) -> str:
    """Legend label of a CPU point: ``flute 4b bf16``, ``llamacpp q4_0 repack``, ``fp32``, ..."""
    k = p["kernel"]
    if k == "flute":
        return f"flute {p['bits']}b {p['dtype']}"
    if k == "llamacpp":
        return f"llama.cpp {p['ggml_type']}" + (" repack" if p.get("layout") == "repack" else "")
    return k


def _cpu_style(p) -> tuple:
    """``(color, line style, marker)`` of a CPU point's series."""
    k = p["kernel"]
    if k == "flute":
        return _COLOR.get(p["bits"], "black"), "-" if p["dtype"] == "bf16" else "-.", "o"
    if k == "llamacpp":
        color = {"q4_0": "tab:green", "iq4_nl": "tab:cyan", "q3_K": "tab:olive",
                 "q2_K": "tab:pink", "bf16": "silver"}.get(p.get("ggml_type"), "tab:gray")
        return color, "--", "s" if p.get("layout") == "repack" else "^"
    return ({"fp32": "black", "bf16": "tab:brown", "torch_int4": "tab:purple"}.get(k, "grey"),
            ":", "o")


def _plot_cpu(plt, doc, path) -> Optional[str]:
    pts = [p for p in doc.get("points") or [] if p.get("cache") == "cold"]
    if not pts:
        return None
    shapes = list(dict.fromkeys((p["N"], p["K"]) for p in pts))
    threads = sorted({p["threads"] for p in pts})
    fig, axes = plt.subplots(len(threads), len(shapes), figsize=(3.8 * len(shapes) + 2, 3.0 * len(threads)),
                             squeeze=False)
    handles = {}
    for r, t in enumerate(threads):
        for c, (n, k) in enumerate(shapes):
            ax = axes[r][c]
            series: Dict[str, tuple] = {}
            for p in pts:
                if p["threads"] == t and (p["N"], p["K"]) == (n, k):
                    s = series.setdefault(cpu_label(p), ([], [], _cpu_style(p), p["kernel"]))
                    s[0].append(p["M"])
                    s[1].append(p["median_ms"])
            for label, (ms, vs, (color, style, marker), kernel) in sorted(series.items()):
                order = sorted(range(len(ms)), key=ms.__getitem__)
                (h,) = ax.plot([ms[i] for i in order], [vs[i] for i in order], style, marker=marker,
                               ms=3, color=color, label=label,
                               alpha=1.0 if kernel == "flute" else 0.75)
                handles.setdefault(label, h)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"N={n} K={k}, {t} thread(s)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if r == len(threads) - 1:
                ax.set_xlabel("M (rows of x)", fontsize=8)
            if c == 0:
                ax.set_ylabel("median ms (cache-cold)", fontsize=8)
    labels = sorted(handles)
    fig.legend([handles[k] for k in labels], labels, loc="center right", fontsize=7)
    bw = doc.get("read_bw_gbps") or {}
    fig.suptitle(f"{doc.get('cpu_model', '?')} | read bw " +
                 ", ".join(f"{t}T {v:.1f} GB/s" for t, v in bw.items()) +
                 f" | commit {str(doc.get('commit', '?'))[:10]}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (3.8 * len(shapes) + 2), 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
