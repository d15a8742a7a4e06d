"""Measure the quality ladder on SmolLM2-135M (not a test; prints a markdown table).

    python benchmarks/ladder.py [--bits 3 4] [--group-size 64] [--calib-tokens N]

Perplexity on flute's built-in eval text (non-overlapping 2048-token windows); calibration on the
separate built-in calibration text. Each step starts from the same fp32 model.
"""
import argparse
import copy
import time

import torch
from torch import nn

from flute import QuantLinear
from flute.calibrate import calibration_samples, quantize_model_calibrated
from flute.evaluate import builtin_text, perplexity
from flute.smollm2 import load_smollm2

STEPS = [
    ("RTN, NF table", dict(method="rtn")),
    ("RTN, NF table, MSE-searched scales", dict(method="rtn", scale_method="mse")),
    ("RTN, learned table (data-free Lloyd)", dict(method="rtn", codebook="learned", act_aware=False)),
    ("RTN, activation-aware learned table", dict(method="rtn", codebook="learned")),
    ("GPTQ-LUT, NF table", dict(method="gptq")),
    ("GPTQ-LUT, activation-aware learned table", dict(method="gptq", codebook="learned")),
]


def densify(model):
    """Swap QuantLinear for nn.Linear holding the dequantized weight (same numbers, faster on CPU)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            w = m.quantized_weight().dequantize()
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = w
            if m.bias is not None:
                lin.bias.data = m.bias.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, nargs="*", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = tok(builtin_text(), return_tensors="pt")["input_ids"]
    samples = calibration_samples(tok, max_tokens=args.calib_tokens)
    print(f"eval tokens {ids.numel()}, calibration tokens {sum(s.numel() for s in samples)}", flush=True)
    print(f"| unquantized (fp32) | {perplexity(model, ids):.2f} |", flush=True)
    for bits in args.bits:
        for i, (label, kw) in enumerate(STEPS):
            if args.steps and i not in args.steps:
                continue
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            quantize_model_calibrated(m, samples, bits=bits, group_size=args.group_size,
                                      progress=False, **kw)
            dt = time.perf_counter() - t0
            ppl = perplexity(densify(m), ids)
            print(f"| {bits}-bit g{args.group_size} | {label} | {ppl:.2f} | {dt:.0f} s |", flush=True)
            del m


if __name__ == "__main__":
    main()
