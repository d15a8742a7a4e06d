"""Model-level measurements used by the demo, the CLI and the tests: perplexity and decode speed."""
from __future__ import annotations

import math
import statistics
import time
from importlib import resources

import torch


def builtin_text() -> str:
    """A ~1,500-word English text shipped with flute (original prose) for quick perplexity checks."""
    return resources.files("flute").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, window: int = 2048) -> float:
    """Perplexity over non-overlapping windows of ``window`` tokens (the usual protocol).

    ``input_ids`` is ``[1, T]`` or ``[T]``. Every token after the first of each window is scored,
    and the negative log-likelihoods are averaged over all scored tokens. Non-finite logits raise
    a ValueError: a model that overflows has no perplexity (rather than a NaN one).
    """
    ids = input_ids.reshape(1, -1)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, ids.shape[1], window):
        chunk = ids[:, start:start + window].to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"the model's logits hold NaN or Inf (window starting at token {start}): "
                             "its weights, or activations in its dtype, are not finite; no "
                             "perplexity can be computed")
        logp = torch.log_softmax(logits[0, :-1], dim=-1)
        nll -= logp.gather(-1, chunk[0, 1:].unsqueeze(-1)).sum().item()
        count += chunk.shape[1] - 1
    if count == 0:
        raise ValueError("perplexity needs at least two tokens")
    return math.exp(nll / count)


@torch.no_grad()
def decode_speeds(models: dict, tokenizer, prompt: str, new_tokens: int = 32, rounds: int = 3) -> dict:
    """Greedy-generate ``new_tokens`` tokens with each model of ``models`` (``{name: model}``),
    ``rounds`` times, round-robin (one decode of each model per round, after a short warm-up of
    each), so that on a shared machine every model sees the same background load; return
    ``{name: (median tokens per second, generated text)}``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        runs[name] = (model, enc, device, [])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)
    texts = {}
    for _ in range(rounds):
        for name, (model, enc, device, rates) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(**enc, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            generated = out[0, enc["input_ids"].shape[1]:]
            rates.append(generated.numel() / (time.perf_counter() - t0))
            texts[name] = generated
    return {name: (statistics.median(rates), tokenizer.decode(texts[name], skip_special_tokens=True))
            for name, (_, _, _, rates) in runs.items()}

