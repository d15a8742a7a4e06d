"""The accuracy of a 2-bit pair-LUT decode (benchmarks/experiments/pair_lut_2bit.cpp), executable,
against the int8 mode's (an experiment for CPU_NOTES item 129, not a test).

    python benchmarks/experiments/pair_lut_quality.py [--out FILE.json] [--skip-ppl]

The pair-LUT arithmetic: for each activation row, each pair of adjacent columns (x0, x1) and each
4-bit index e, v = t[e & 3] * x0 + t[e >> 2] * x1 (float32); per chunk of CHUNK columns the entries
are rounded to int8 with the scale max|v| / 127 (ties to even, as `vcvtps2dq`); a weight row's pair
index selects an entry, and the exact sums of a chunk's entries times the chunk scale times the row's
group scale give the output. Measured here: the relative error against float64 on random weights
(as flute.testing.reference_qgemm_int8 for the int8 mode) and the perplexity of SmolLM2-135M at 2
bits (the demo's GPTQ-LUT recipe) with every quantized linear layer run through that arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import time

os.environ["FLUTE_CPU_LARGE_M"] = "1000000"  # the int8 mode on every row, as benchmarks/int8_quality.py

import torch  # noqa: E402

import flute  # noqa: E402
from flute.testing import (random_quantized, reference_qgemm, reference_qgemm_int8,  # noqa: E402
                           relative_error)


def pair_lut_entries(x: torch.Tensor, table: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[rows, ceil(K / chunk) * chunk / 2, 16]``: each pair's 16 int8 entries times their scale."""
    rows, k = x.shape
    xp = torch.nn.functional.pad(x.float(), (0, -k % chunk))
    t, e = table.float(), torch.arange(16)
    v = t[e & 3] * xp[:, 0::2, None] + t[e >> 2] * xp[:, 1::2, None]
    vc = v.reshape(rows, -1, chunk // 2, 16)
    mx = vc.abs().amax(dim=(-1, -2), keepdim=True)
    q = torch.round(vc * torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx)))
    return (q * (mx / 127.0)).reshape(rows, -1, 16)


def pair_lut_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[pairs * 16, N]``: for each row, its group scale at the entry its pair index selects."""
    n, k = codes.shape
    c = torch.nn.functional.pad(codes.long(), (0, k % 2))
    idx = c[:, 0::2] | (c[:, 1::2] << 2)
    g = (torch.arange(idx.shape[1]) * 2) // (group_size if group_size > 0 else k)
    onehot = torch.zeros(n, idx.shape[1], 16)
    onehot.scatter_(2, idx.unsqueeze(-1), scales.float()[:, g].unsqueeze(-1))
    return onehot.reshape(n, -1).t().contiguous()


class PairLutLinear(torch.nn.Module):
    """A QuantLinear's weight run through the pair-LUT arithmetic (2 bits, no offsets)."""

    def __init__(self, q: flute.QuantLinear, chunk: int):
        super().__init__()
        qw = q.quantized_weight()
        self.w = pair_lut_weight(qw.codes(), qw.scales, q.group_size)
        self.table, self.chunk, self.bias = qw.table, chunk, q.bias

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        e = pair_lut_entries(x2, self.table, self.chunk)[:, : self.w.shape[0] // 16]
        y = (e.reshape(e.shape[0], -1) @ self.w).reshape(*x.shape[:-1], -1)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)


def op_errors():
    rows = []
    for n, k in [(1536, 576), (576, 1536), (2048, 2048), (512, 4096)]:
        for kind in ("randn", "outliers"):
            errs = {"int8": [], "pair_lut_64": [], "pair_lut_32": []}
            for seed in range(5):
                w = random_quantized(n, k, 2, 64, seed=seed)
                g = torch.Generator().manual_seed(100 + seed)
                x = torch.randn(4, k, generator=g)
                if kind == "outliers":  # a few columns 20x larger, as LLM activations have
                    x[:, torch.randint(0, k, (k // 64,), generator=g)] *= 20
                x = x.bfloat16().float()
                ref = reference_qgemm(x, w, 64)
                errs["int8"].append(relative_error(reference_qgemm_int8(x, w, 64), ref))
                for chunk in (64, 32):
                    y = pair_lut_entries(x, w.table, chunk)[:, : k // 2]
                    y = y.reshape(4, -1) @ pair_lut_weight(w.codes, w.scales, 64)
                    errs[f"pair_lut_{chunk}"].append(relative_error(y, ref))
            row = {"N": n, "K": k, "x": kind, **{key: sorted(v)[2] for key, v in errs.items()}}
            print(f"  {n}x{k} x={kind:8s}: int8 {row['int8']:.2e}, pair-LUT chunk 64 {row['pair_lut_64']:.2e}, "
                  f"chunk 32 {row['pair_lut_32']:.2e}")
            rows.append(row)
    return rows


def perplexities():
    from flute import ops, smollm2
    from flute.calibrate import calibration_samples, quantize_model_calibrated
    from flute.evaluate import builtin_text, perplexity
    model, tok = smollm2.load_smollm2(torch.float32)
    ids = tok(builtin_text(), return_tensors="pt").input_ids
    q = copy.deepcopy(model)
    quantize_model_calibrated(q, calibration_samples(tok), bits=2, group_size=64, method="gptq",
                              codebook="learned")
    res = {"format": "2-bit GPTQ-LUT learned g64", "tokens": int(ids.numel()),
           "float32": perplexity(model, ids)}
    for mode in ("exact", "int8"):
        ops.set_cpu_mode(mode)
        res[mode] = perplexity(q, ids)
    ops.set_cpu_mode("exact")
    for chunk in (64, 32):
        qq = copy.deepcopy(q)
        for m in list(qq.modules()):
            for name, child in list(m.named_children()):
                if isinstance(child, flute.QuantLinear):
                    setattr(m, name, PairLutLinear(child, chunk))
        t = time.perf_counter()
        res[f"pair_lut_{chunk}"] = perplexity(qq, ids)
        res[f"pair_lut_{chunk}_seconds"] = time.perf_counter() - t
    for key in ("int8", "pair_lut_64", "pair_lut_32"):
        res[f"{key}_cost_pct"] = 100 * (res[key] / res["exact"] - 1)
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-ppl", action="store_true")
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("relative error against float64 (2 bits, g64; median of 5 seeds):")
    record = {"what": "2-bit pair-LUT arithmetic vs the int8 mode: relative error and SmolLM2 perplexity",
              "commit": commit, "command": "python benchmarks/experiments/pair_lut_quality.py",
              "torch": torch.__version__, "op_errors": op_errors()}
    if not a.skip_ppl:
        record["perplexity"] = perplexities()
    out = a.out or f"benchmarks/results/pair-lut-quality-2bit-{datetime.date.today():%Y%m%d}.json"
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
