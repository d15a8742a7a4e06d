"""Turn what a device call of benchmarks/device_check.sh returned into a committed record.

    python benchmarks/gpu_record.py DIR [--extra NAME=FILE ...] [--note TEXT]

DIR is the folder the device tool fetched (device_check.json, logs.tgz, optional bench.json and any
files named with --extra). Writes benchmarks/results/<gpu>-<UTC time of the run>-check.json (the
record, with the quick benchmark's rows; parsed from the bench log when bench.json did not come
back, which the record then says), <same>-logs.tgz beside it, and a PNG of the benchmark rows.
"""
import argparse
import json
import os
import re
import shutil
import tarfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROW = re.compile(r"^(fp16 matmul|flute (\d)-bit) N=(\d+) K=(\d+) M=(\d+): ([\d.]+) us")


def bench_rows_from_log(logs_tgz):
    """Median rows printed by the bench step, for runs whose bench.json did not come back."""
    with tarfile.open(logs_tgz) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith("/bench.log")), None)
        if member is None:
            return [], None
        text = tf.extractfile(member).read().decode()
    rows, copy = [], None
    for line in text.splitlines():
        m = re.search(r"device-to-device copy (\d+) GB/s", line)
        if m:
            copy = float(m.group(1))
        m = ROW.match(line)
        if m:
            impl, bits, n, k, mm, us = m.groups()
            rows.append({"impl": impl if bits is None else f"flute {bits}-bit g128", "bits": None if bits is None else int(bits),
                         "N": int(n), "K": int(k), "M": int(mm), "median_us": float(us)})
    return rows, copy


def plot(rows, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.6), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        sub = [r for r in rows if (r["N"], r["K"]) == (n, k) and "median_us" in r]
        impls = sorted({r["impl"] for r in sub}, key=lambda s: (s != "fp16 matmul", s))
        ms = sorted({r["M"] for r in sub})
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            ys = [next((r["median_us"] for r in sub if r["impl"] == impl and r["M"] == m), 0) for m in ms]
            ax.bar([j + i * width for j in range(len(ms))], ys, width, label=impl)
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(ms))], [f"M={m}" for m in ms])
        ax.set_ylabel("median µs per call (lower is better)")
        ax.set_title(f"N={n} K={k}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--extra", nargs="*", default=[], help="NAME=FILE: JSON files to embed under NAME")
    ap.add_argument("--logs", default=None, help="logs archive to commit (default DIR/logs.tgz)")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    rec = json.load(open(os.path.join(a.dir, "device_check.json")))
    gpu = re.sub(r"[^a-z0-9]+", "", rec.get("device", "gpu").lower().replace("nvidia", ""))
    stamp = rec["time_utc"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    base = os.path.join(RESULTS, f"{gpu}-{stamp}-check")
    bench = os.path.join(a.dir, "bench.json")
    if os.path.exists(bench):
        rec["bench"] = json.load(open(bench))
    else:
        rows, copy = bench_rows_from_log(os.path.join(a.dir, "logs.tgz"))
        if rows:
            rec["bench"] = {"copy_gbps": copy, "rows": rows, "source": "medians parsed from the bench "
                            "step's log: the step broke before bench.json was written, so the raw "
                            "per-replay timings did not come back"}
    for spec in a.extra:
        name, path = spec.split("=", 1)
        rec[name] = json.load(open(path))
    if a.note:
        rec["note"] = a.note
    json.dump(rec, open(base + ".json", "w"), indent=1)
    shutil.copy(a.logs or os.path.join(a.dir, "logs.tgz"), base + "-logs.tgz")
    if rec.get("bench", {}).get("rows"):
        plot(rec["bench"]["rows"], f"{rec['device']}, commit {rec['commit'][:10]}, CUDA graphs, weights "
             f"rotated beyond L2", base + ".png")
    print("wrote", base + ".json")


if __name__ == "__main__":
    main()
