"""End to end: Hugging Face ``generate`` with a static cache (and, on CUDA, CUDA graphs through
``torch.compile``) on a Llama-3-8B-shaped model with random weights (a tiny Llama on the CPU):
decode and prefill tokens/s, dense and with every decoder linear swapped for a random flute layer."""
from __future__ import annotations

import statistics
import time
from typing import Dict, Optional

import torch

from .weights import random_quant_linear

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY_LLAMA = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def build_random_llama(shape: Dict[str, object], layers: Optional[int], device: torch.device,
                       dtype: torch.dtype = torch.float16):
    """A LlamaForCausalLM of the given shape with random weights, built on ``device`` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(shape)
    if layers:
        kw["num_hidden_layers"] = layers
    config = LlamaConfig(**kw)
    config.eos_token_id = None
    config.bos_token_id = None
    config.pad_token_id = 0
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # explicit random init: never time uninitialized memory
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def swap_linears(model, make) -> int:
    """Replace every ``nn.Linear`` of the decoder layers (not lm_head) by ``make(name, linear)``."""
    from ..linear import QuantLinear
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, QuantLinear)) and ".layers." in f".{n}"]
    for i, (name, mod) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, make(i, mod))
    return len(targets)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_generate(model, input_ids, new_tokens, device, compile_on: bool):
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0, eos_token_id=None,
                          disable_compile=not compile_on)
    mask = torch.ones_like(input_ids)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gc)
    _sync(device)
    dt = time.perf_counter() - t0
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} new tokens, "
                           f"asked for {new_tokens}")
    return dt


def e2e_measure(model, device, batches, prompt_len, new_tokens, prefill_tokens, repeats,
                compile_on, log=print):
    """Decode tokens/s per batch (time of N new tokens minus time of 1, so prefill cancels) and
    prefill tokens/s at ``prefill_tokens`` (batch 1, time to the first token)."""
    res = []
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    for b in batches:
        # generate sizes its static cache by the longest earlier call: reset so that every variant
        # and batch attends over the same prompt_len + new_tokens positions.
        model._previous_max_cache_length = -1
        ids = torch.randint(1, vocab, (b, prompt_len), generator=g).to(device)
        for _ in range(2):  # compile / capture / warm up both lengths
            _timed_generate(model, ids, new_tokens, device, compile_on)
            _timed_generate(model, ids, 1, device, compile_on)
        t_n = statistics.median(_timed_generate(model, ids, new_tokens, device, compile_on)
                                for _ in range(repeats))
        t_1 = statistics.median(_timed_generate(model, ids, 1, device, compile_on)
                                for _ in range(repeats))
        r = {"batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
             "generate_s": t_n, "first_token_s": t_1}
        if t_n > t_1 and new_tokens > 1:
            step = (t_n - t_1) / (new_tokens - 1)
            r.update(decode_ms_per_step=step * 1e3, decode_tok_s=b / step)
            log(f"  batch {b:3d}: {r['decode_tok_s']:10.1f} decode tok/s "
                f"({r['decode_ms_per_step']:.2f} ms/step)")
        else:
            r.update(decode_ms_per_step=None, decode_tok_s=None,
                     note="t(N tokens) <= t(1 token): timing noise swamps decode; raise --e2e-new-tokens")
            log(f"  batch {b:3d}: decode not measurable (t(N)={t_n:.4f}s <= t(1)={t_1:.4f}s)")
        res.append(r)
    if prefill_tokens:
        model._previous_max_cache_length = -1
        ids = torch.randint(1, vocab, (1, prefill_tokens), generator=g).to(device)
        for _ in range(2):
            _timed_generate(model, ids, 1, device, compile_on)
        t = statistics.median(_timed_generate(model, ids, 1, device, compile_on) for _ in range(repeats))
        res.append({"batch": 1, "prefill_tokens": prefill_tokens, "prefill_s": t,
                    "prefill_tok_s": prefill_tokens / t})
        log(f"  prefill {prefill_tokens}: {prefill_tokens / t:10.1f} tok/s")
    return res


def run_e2e(args, env, log=print) -> Dict[str, object]:
    dev = torch.device(args.device)
    cpu = dev.type == "cpu"
    shape = TINY_LLAMA if cpu else LLAMA3_8B
    layers = args.e2e_layers or (None if not cpu else 2)
    batches = args.e2e_batch or ([1, 2] if cpu else [1, 8, 32])
    prompt = args.e2e_prompt or (8 if cpu else 128)
    new = args.e2e_new_tokens or (16 if cpu else 128)
    prefill = args.e2e_prefill if args.e2e_prefill is not None else (32 if cpu else 2048)
    repeats = args.e2e_repeats or (1 if cpu else 3)
    variants = args.e2e_bits or ["fp16", "4", "3", "2"]
    compile_on = not cpu and not args.e2e_no_compile
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    doc = dict(env, kind="e2e", model=("tiny-llama (CPU smoke)" if cpu else "llama3-8b-shaped") +
               ", random weights", layers=layers or shape["num_hidden_layers"],
               group_size=args.e2e_group, prefill_tokens=prefill, compiled=compile_on,
               method=("HF generate, cache_implementation='static'; decode steps run through "
                       "transformers' automatic torch.compile (mode reduce-overhead: CUDA graphs); "
                       "prefill runs eagerly inside generate. decode tok/s = batch * (N-1) / "
                       "(t(N new tokens) - t(1 new token)); prefill tok/s = tokens / t(1 new token)"
                       if compile_on else "HF generate, static cache, no compile"),
               points=[], e2e=[], skipped=[])
    torch.manual_seed(0)
    log(f"e2e: building a random {doc['model']} on {dev} ({doc['layers']} layers)")
    model = build_random_llama(shape, layers, dev, torch.float16)
    for v in variants:
        if deadline and time.monotonic() > deadline:
            doc["truncated"] = True
            log("time budget spent: stopping the end-to-end run (results are partial)")
            break
        label = "fp16" if v == "fp16" else f"flute-{v}bit-g{args.e2e_group}"
        if v != "fp16":
            bits = int(v)
            swap_linears(model, lambda i, m, bits=bits: random_quant_linear(m, bits, args.e2e_group, i))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for attr in ("_compiled_call", "_last_compile_config"):
            if hasattr(model, attr):
                delattr(model, attr)
        if compile_on:
            torch._dynamo.reset()
        wbytes = sum(t.numel() * t.element_size() for n, t in
                     list(model.named_parameters()) + list(model.named_buffers()) if ".layers." in f".{n}")
        log(f"{label}: decoder weights {wbytes / 2 ** 30:.2f} GiB")
        try:
            rows = e2e_measure(model, dev, batches, prompt, new, prefill, repeats, compile_on, log)
        except Exception as e:  # noqa: BLE001
            doc["skipped"].append({"variant": label, "reason": f"{type(e).__name__}: {str(e)[:400]}"})
            log(f"  {label} FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        for r in rows:
            r.update(variant=label, bits=None if v == "fp16" else int(v), decoder_weight_bytes=wbytes)
            doc["e2e"].append(r)
    fp = {(r["batch"], "prefill_tok_s" in r): r for r in doc["e2e"] if r["variant"] == "fp16"}
    for r in doc["e2e"]:
        key = "prefill_tok_s" if "prefill_tok_s" in r else "decode_tok_s"
        base = fp.get((r["batch"], key == "prefill_tok_s"))
        r["speedup_vs_fp16"] = r[key] / base[key] if base and base.get(key) and r.get(key) else None
    return doc
