"""A long random fuzz of the CPU op against the float64 reference and the int8 spec (CPU_NOTES item
285; not a test: the bounded versions are tests/test_properties.py and tests/test_cpu_int8.py).

    python benchmarks/experiments/cpu_fuzz.py --seconds 1200 --seed 4

Each case draws bits, group size (multiples of 32, -1, and 100 / 48, which compute exactly), N, K
(up to 5000), M (0 to 513: the one-row, 4-row, 16-row, panel and prefill paths), activation and
scale dtypes, offsets, mode (int8 / exact / bf16), the forced ISA path, 1 or 2 threads, the form of
x (contiguous, strided, 3-D) and the table (random, uniform integers, zeros, large), and checks
`torch.ops.flute.qgemm` on the CPU layout:

- normwise (``||y - ref|| / || |x| |W|^T ||``) against the nearer of the exact reference and, in
  the int8 mode, its spec: below 1e-5 for float32 x, 2e-3 for float16, 1e-2 for bfloat16;
- elementwise against the nearer reference: ``|y - ref| <= c S + eps |ref|`` with ``S = |x| |W|^T``,
  ``c`` the rounding of the weights where a path rounds them (bf16 / fp16 panels) and ``eps`` the
  output dtype's rounding (plus fp16's subnormal spacing);
- a zero table without offsets gives exact zeros; a non-finite output only where the reference
  overflows the output dtype.

Prints each failing case (its parameters) and a count at the end.
"""
import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

from flute import ops
from flute.cpu_layout import to_cpu_layout
from flute.format import dequantize_codes
from flute.testing import random_quantized, reference_qgemm, reference_qgemm_int8

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from cpu_kernel_common import normwise_error  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MS = [0, 1, 1, 1, 2, 3, 4, 4, 5, 7, 8, 15, 16, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 300, 513]
KS = [1, 31, 64, 100, 130, 333, 576, 577, 1000, 1536, 2047, 2048, 3000, 4096, 4160, 5000]
NS = [1, 3, 4, 15, 16, 17, 33, 64, 67, 129, 255, 256, 700]
NORMWISE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
OUT_EPS = {"fp32": 2 ** -23, "bf16": 2 ** -8, "fp16": 2 ** -11}
WEIGHT_EPS = {"fp32": 2e-6, "bf16": 2 ** -8, "fp16": 2 ** -10}
MAX_FINITE = {"fp32": 3e38, "bf16": 3e38, "fp16": 6.5e4}


def draw(r: random.Random, isas: list) -> dict:
    N = r.choice(NS)
    K = r.choice(KS) if r.random() < 0.8 else r.randint(1, 5000)
    M = r.choice(MS)
    if M * N * K > 2.5e8:
        M = max(1, int(2.5e8 // (N * K)))
    isa = r.choice([i for i in isas if i != "portable" or N * K < 3e5] or isas)  # portable: slow
    return dict(bits=r.choice([2, 3, 4]), group=r.choice([64, 64, 64, 32, 128, 256, -1, 100, 48]), N=N, K=K,
                M=M, x=r.choice(list(DTYPES)), s=r.choice(list(DTYPES)), offs=r.random() < 0.3,
                mode=r.choice(["int8", "int8", "exact", "bf16"]), isa=isa, threads=r.choice([1, 2]),
                xform=r.choice(["contiguous", "contiguous", "strided", "3d"]),
                table=r.choice(["randn", "randn", "randn", "int", "zeros", "big"]),
                xscale=r.choice([1.0, 1e-3, 30.0]), outlier=r.random() < 0.2)


def check(c: dict, r: random.Random, g: torch.Generator) -> None:
    bits, group, N, K, M, xd = c["bits"], c["group"], c["N"], c["K"], c["M"], c["x"]
    w = random_quantized(N, K, bits, group, offsets=c["offs"], dtype=DTYPES[c["s"]], generator=g)
    if c["table"] == "int":
        w = w._replace(table=torch.arange(2 ** bits, dtype=torch.float32) - 2 ** (bits - 1))
    elif c["table"] == "zeros":
        w = w._replace(table=torch.zeros(2 ** bits))
    elif c["table"] == "big":
        w = w._replace(table=torch.randn(2 ** bits, generator=g) * 1e3)
    x = torch.randn(M, K, generator=g) * c["xscale"]
    if c["outlier"] and M * K:
        x[r.randrange(M), r.randrange(K)] *= 1000
    x = x.to(DTYPES[xd])
    xx = x.t().contiguous().t() if c["xform"] == "strided" else x
    if c["xform"] == "3d" and M % 2 == 0 and M:
        xx = x.reshape(2, M // 2, K)
    y = torch.ops.flute.qgemm(xx, to_cpu_layout(w.codes, bits), w.scales, w.offsets, w.table, bits, group, K, N)
    y = y.reshape(M, N)
    assert y.dtype == DTYPES[xd], f"dtype {y.dtype}"
    if M == 0:
        return
    ref = reference_qgemm(x, w, group)
    if not bool(torch.isfinite(y).all()):
        assert float(ref.abs().max()) > 0.9 * MAX_FINITE[xd] or not bool(torch.isfinite(ref).all()), "non-finite"
        return
    if c["table"] == "zeros" and not c["offs"]:
        assert bool((y == 0).all()), "a zero table gave a nonzero output"
        return
    refs = {"exact": ref}
    if c["mode"] == "int8":
        refs["spec"] = reference_qgemm_int8(x, w, group)
    errs = {k: normwise_error(y, v, x, w, group) for k, v in refs.items()}
    if any(math.isnan(e) for e in errs.values()):  # |x| |W| is zero everywhere
        assert bool((y.double() == ref).all()), "S = 0 but y != ref"
        return
    tol = max(NORMWISE[xd], 8e-3) if c["mode"] == "bf16" else NORMWISE[xd]
    assert min(errs.values()) < tol, f"normwise {errs} tol {tol}"
    if c["mode"] == "bf16":
        return
    wabs = dequantize_codes(w.codes, w.scales.abs(), None if w.offsets is None else w.offsets.abs(),
                            w.table.abs(), group, torch.float64)
    S = x.double().abs() @ wabs.t()
    sub = 2 ** -24 if xd == "fp16" else 1e-37
    msgs = []
    for key, rr in refs.items():
        c_w = WEIGHT_EPS[xd] if key == "exact" else 2e-6
        d = (y.double() - rr).abs()
        lim = c_w * S + OUT_EPS[xd] * rr.abs() + sub
        if bool((d <= lim).all()):
            return
        i = int((d / lim).argmax())
        msgs.append(f"{key}: y {y.flatten()[i].item():.6g} ref {rr.flatten()[i].item():.6g} "
                    f"S {S.flatten()[i].item():.4g} worst {float((d / lim).max()):.3g}x the bound")
    raise AssertionError("elementwise " + "; ".join(msgs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not ops.HAS_CPU_KERNEL:
        sys.exit(f"flute._cpu is not built: {ops.CPU_KERNEL_ERROR}")
    isas = []
    for name in ("avx512", "avx2", "portable"):
        try:
            ops.set_cpu_isa(name)
            isas.append(name)
        except RuntimeError:  # this CPU lacks it
            pass
    ops.set_cpu_isa("auto")
    mode0, threads0 = ops.get_cpu_mode(), torch.get_num_threads()
    r, g = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
    end, passed, failed = time.time() + a.seconds, 0, 0
    while time.time() < end:
        c = draw(r, isas)
        try:
            ops.set_cpu_isa(c["isa"])
            ops.set_cpu_mode(c["mode"])
            torch.set_num_threads(c["threads"])
            check(c, r, g)
            passed += 1
        except (AssertionError, RuntimeError) as e:
            failed += 1
            print("FAIL", c, type(e).__name__, str(e)[:300], flush=True)
        finally:
            ops.set_cpu_isa("auto")
            ops.set_cpu_mode(mode0)
            torch.set_num_threads(threads0)
    print(f"seed {a.seed}: {passed} passed, {failed} failed", flush=True)


if __name__ == "__main__":
    main()
