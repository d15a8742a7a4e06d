"""The perplexity cost of the CPU kernel's int8 mode (its default) on SmolLM2-135M (not a test).

    python benchmarks/int8_quality.py [--out FILE.json] [--gptq [BITS ...]] [--skip-data-free] [--bits B ...]

For each format: quantize (the demo's data-free recipes; with --gptq also the demo's GPTQ-LUT recipe),
then perplexity on flute's built-in text with the fused kernel in "exact" and in "int8" mode. The
fused kernel serves every batch size here (FLUTE_CPU_LARGE_M and FLUTE_CPU_ROWS16_LARGE_M are raised
before flute loads), so the whole 1,747-token window runs through the int8 arithmetic, as decode
would. 2 bits: where the CPU has the 16-row kernel (AVX-512 VBMI + VNNI) that window runs its int8
activations, while decode (below cpu_rows16_m(2) rows) runs pair tables; FLUTE_CPU_ROWS16_M2=1000000
measures the pair tables instead. The record says which ran ("int8_2bit"). The issue's rule: int8
becomes a default only if it costs < 0.5% perplexity.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time

# read once by flute._cpu: no panel path in this run
os.environ["FLUTE_CPU_LARGE_M"] = os.environ["FLUTE_CPU_ROWS16_LARGE_M"] = "1000000"

import torch  # noqa: E402

import flute  # noqa: E402
from flute import ops, smollm2  # noqa: E402
from flute.calibrate import calibration_samples, quantize_model_calibrated  # noqa: E402
from flute.evaluate import builtin_text, perplexity  # noqa: E402
from flute.testing import int8_uses_pair_tables  # noqa: E402

FORMATS = [  # (label, bits, quantize_model kwargs): the demo's data-free recipes, g64
    ("4-bit NF absmax g64", 4, dict(codebook="nf", scale_method="absmax")),
    ("4-bit int asym g32", 4, dict(codebook="int", offsets=True, group_size=32)),
    ("3-bit NF mse g64", 3, dict(codebook="nf", scale_method="mse")),
    ("2-bit NF mse g64", 2, dict(codebook="nf", scale_method="mse")),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--gptq", nargs="*", type=int, default=None, metavar="BITS",
                   help="also the demo's GPTQ-LUT recipe at these bit widths (default 4)")
    p.add_argument("--skip-data-free", action="store_true", help="only the GPTQ-LUT models")
    p.add_argument("--bits", nargs="+", type=int, default=None,
                   help="only the data-free formats of these bit widths")
    a = p.parse_args()
    # the commit measured, read before the run (a commit made meanwhile is not what ran)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if ops.get_cpu_isa() == "portable":
        print("note: portable CPU path (slow)")
    model, tok = smollm2.load_smollm2(torch.float32)
    ids = tok(builtin_text(), return_tensors="pt").input_ids
    base = perplexity(model, ids)
    print(f"float32: perplexity {base:.3f}")
    rows = []
    formats = [] if a.skip_data_free else [f for f in FORMATS if not a.bits or f[1] in a.bits]
    if a.gptq is not None:
        formats += [(f"{b}-bit GPTQ-LUT learned g64", b, None) for b in (a.gptq or [4])]
    for label, bits, kw in formats:
        q = copy.deepcopy(model)
        if kw is None:
            quantize_model_calibrated(q, calibration_samples(tok), bits=bits, group_size=64,
                                      method="gptq", codebook="learned")
        else:
            kw = dict(kw)
            flute.quantize_model(q, bits=bits, group_size=kw.pop("group_size", 64), progress=False, **kw)
        res = {"format": label, "bits": bits}
        for mode in ("exact", "int8"):
            ops.set_cpu_mode(mode)
            t = time.perf_counter()
            res[mode] = perplexity(q, ids)
            res[f"{mode}_seconds"] = time.perf_counter() - t
        ops.set_cpu_mode("exact")
        res["int8_cost_pct"] = 100 * (res["int8"] / res["exact"] - 1)
        print(f"{label}: exact {res['exact']:.3f}, int8 {res['int8']:.3f} ({res['int8_cost_pct']:+.2f}%)")
        rows.append(res)
    record = {"what": "SmolLM2-135M perplexity, CPU kernel exact vs int8 mode", "commit": commit,
              "command": "python benchmarks/int8_quality.py " + " ".join(sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "isa": ops.get_cpu_isa(),
              "torch": torch.__version__, "tokens": int(ids.numel()), "float32_perplexity": base,
              "int8_2bit": "pair tables" if int8_uses_pair_tables(2, int(ids.numel())) else "int8 activations",
              "rows": rows}
    out = a.out or f"benchmarks/results/int8-quality-{datetime.date.today():%Y%m%d}.json"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
