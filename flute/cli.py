"""The ``flute`` command line: ``flute demo``, ``flute bench``, ``flute quantize``, ``flute eval``,
``flute info``."""
from __future__ import annotations

import argparse
import sys

from .spec import CODEBOOK_NAMES, METHODS, SCALE_METHODS, QuantSpec


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after "bench" goes to the suite's own parser
        from .bench import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="flute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize SmolLM2-135M at 4 and 3 bits and report size, "
                                       "perplexity and speed")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    demo.add_argument("--group-size", type=int, default=64)
    demo.add_argument("--tokens", type=int, default=32, help="tokens to generate per timing")
    demo.add_argument("--method", choices=METHODS, default="gptq",
                      help="gptq: calibrated GPTQ-LUT with a learned table (best quality); "
                           "rtn: data-free round to nearest (fastest)")
    sub.add_parser("bench", help="kernel and end-to-end benchmarks (flute bench --help)")
    _add_quantize_parser(sub)
    _add_eval_parser(sub)
    info = sub.add_parser("info", help="which kernels this machine runs (CPU path, units built, "
                                       "CUDA extension, GPUs) and hints for each slow fallback")
    info.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        return info_main(as_json=args.json)
    try:
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "eval":
            return cmd_eval(args)
        from .demo import run_demo
        return run_demo(device=args.device, bits=args.bits, group_size=args.group_size,
                        new_tokens=args.tokens, method=args.method)
    except CliError as e:
        print(f"flute {args.command}: error: {e}", file=sys.stderr)
        return 2


class CliError(Exception):
    """A problem with the command's input, reported as one line and exit code 2."""


def _fail_on(exc_types, what: str, hint: str = ""):
    """A context manager turning ``exc_types`` raised inside into a one-line :class:`CliError`."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except exc_types as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CliError(f"{what}: {first}{hint}") from None
    return guard()


# -- flute quantize / flute eval -------------------------------------------------------------------
_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32"}


def _add_quantize_parser(sub):
    q = sub.add_parser("quantize", help="quantize a Hugging Face model directory or a GGUF file "
                                        "and save a flute checkpoint")
    q.add_argument("src", help="HF model directory (or hub id) or a .gguf file")
    q.add_argument("out", help="output directory (loads with from_pretrained after import flute)")
    q.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))
    q.add_argument("--group-size", type=int, default=64, help="columns per scale; -1 = per row")
    q.add_argument("--codebook", default="nf",
                   choices=[c for c in CODEBOOK_NAMES if c != "custom"])
    q.add_argument("--method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest (data-free); gptq: GPTQ-LUT error feedback")
    q.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text file (gptq uses flute's built-in text when omitted; "
                        "with --codebook learned it makes the table activation-aware; "
                        "'builtin' names the built-in text)")
    q.add_argument("--calib-tokens", type=int, default=None, help="use at most this many tokens")
    q.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    q.add_argument("--scale-method", default=None, choices=SCALE_METHODS)
    q.add_argument("--offsets", action="store_true", help="asymmetric groups (store offsets)")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of mean diag)")
    q.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PATTERN",
                   help="modules kept in full precision (default: lm_head)")
    q.add_argument("--dtype", default="float16", choices=sorted(_DTYPES),
                   help="dtype of scales and of the unquantized tensors in the output")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda if available)")
    q.add_argument("--max-shard-size", default="2GB")
    q.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists and is not empty (it is swapped in only once the "
                        "new checkpoint is complete)")
    q.add_argument("--no-progress", action="store_true")


def _add_eval_parser(sub):
    e = sub.add_parser("eval", help="perplexity of a (flute) model on a text, non-overlapping "
                                    "windows; optionally against the unquantized model")
    e.add_argument("model", help="model directory (flute checkpoint or any HF causal LM) or .gguf")
    e.add_argument("--text", default=None, metavar="FILE", help="text file (default: built-in text)")
    e.add_argument("--baseline", default=None, metavar="SRC",
                   help="the unquantized model (HF directory or .gguf) to compare against")
    e.add_argument("--window", type=int, default=2048, help="tokens per window (default 2048)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")


def _check_source(src: str) -> None:
    """A local path must exist and hold a model; anything else must look like a hub id."""
    import os
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise CliError(f"{src} is a directory without a config.json: not a Hugging Face model")
        return
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise CliError(f"{src} is a file but not a .gguf model; give a model directory or a "
                           ".gguf file")
        return
    looks_local = src.startswith((".", "/", "~")) or src.endswith(".gguf") or src.count("/") != 1
    if looks_local:
        raise CliError(f"{src} does not exist (give a model directory, a .gguf file or a hub id "
                       "such as org/name)")


def _load(src, dtype=None, device_map=None):
    """``(model, tokenizer)`` from an HF directory/hub id or a GGUF file (flute registered first);
    a source that cannot be loaded is a :class:`CliError` naming it."""
    _check_source(src)
    with _fail_on((OSError, ValueError, KeyError, RuntimeError, ImportError),
                  f"cannot load the model {src}"):
        return _load_unchecked(src, dtype, device_map)


def _load_unchecked(src, dtype=None, device_map=None):
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.huggingface import register
    register()
    kwargs = {} if dtype is None else {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if str(src).endswith(".gguf"):
        folder, name = os.path.dirname(os.path.abspath(src)), os.path.basename(src)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs).eval(), tok
    tok = AutoTokenizer.from_pretrained(src)
    return AutoModelForCausalLM.from_pretrained(src, **kwargs).eval(), tok


def _disk_bytes(path) -> int:
    import os
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                     if f.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")))
    return total


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _prepare_output(src: str, out: str, overwrite: bool) -> str:
    """Check OUT before any work: not the source, empty unless ``--overwrite``, writable. Returns
    the fresh temporary sibling directory the checkpoint is written into."""
    import os
    import tempfile

    real_out = os.path.realpath(out)
    real_src = os.path.realpath(src)
    src_dir = real_src if os.path.isdir(real_src) else os.path.dirname(real_src)
    if real_out == src_dir or real_out == real_src:
        raise CliError(f"the output {out} is the source itself; choose another directory")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CliError(f"the output {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise CliError(f"the output directory {out} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(real_out) or "."
    if not os.path.isdir(parent):
        raise CliError(f"the output's parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write into {parent} (permission denied)")
    return tempfile.mkdtemp(prefix=f".{os.path.basename(real_out)}.tmp-", dir=parent)


def _swap_into_place(tmp: str, out: str) -> None:
    """Rename the finished checkpoint ``tmp`` to ``out``; an old ``out`` is removed only after."""
    import os
    import shutil

    old = None
    if os.path.exists(out):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_quantize(args) -> int:
    import os
    import shutil
    import time

    import torch

    from .calibrate import calibration_samples, quantize_model_calibrated
    from .linear import QuantLinear
    from .model import model_weight_bytes
    from .quantize import ScaleOverflowError

    t0 = time.perf_counter()
    with _fail_on(ValueError, "invalid settings"):
        spec = QuantSpec(bits=args.bits, group_size=args.group_size, codebook=args.codebook,
                         scale_method=args.scale_method, offsets=args.offsets, method=args.method,
                         skip=tuple(args.skip))
    for name in ("calib_tokens", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.damp <= 0:
        raise CliError(f"--damp must be positive, got {args.damp}")
    if args.calib not in (None, "builtin") and not os.path.isfile(args.calib):
        raise CliError(f"calibration text {args.calib} does not exist")
    _check_source(args.src)
    tmp = _prepare_output(args.src, args.out, args.overwrite)
    try:
        dtype = getattr(torch, _DTYPES[args.dtype])
        print(f"flute quantize: loading {args.src}", flush=True)
        model, tok = _load(args.src, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        src_bytes = _disk_bytes(args.src)
        calibrated = args.method == "gptq" or (args.codebook == "learned" and args.calib is not None)
        samples = None
        if calibrated:
            text = None
            if args.calib not in (None, "builtin"):
                with open(args.calib, encoding="utf-8") as f:
                    text = f.read()
            with _fail_on(ValueError, "calibration text"):
                samples = calibration_samples(tok, text, seq_len=args.seq_len,
                                              max_tokens=args.calib_tokens)
            print(f"flute quantize: {sum(s.numel() for s in samples)} calibration tokens "
                  f"({'built-in text' if text is None else args.calib})", flush=True)
        hint = "; try --dtype float32" if args.dtype not in ("float32", "fp32") else ""
        with _fail_on(ScaleOverflowError, "quantization failed", hint):
            quantize_model_calibrated(model, samples, spec=spec, act_aware=calibrated,
                                      damp=args.damp, device=args.device, scale_dtype=dtype,
                                      progress=not args.no_progress)
        # the unquantized tensors (embeddings, norms, lm_head) take the output dtype; tables stay fp32
        tables = {n: m.table for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        model.to(dtype)
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                m.table = tables[n]
        model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        tok.save_pretrained(tmp)
        _swap_into_place(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap succeeded
    out_bytes = _disk_bytes(args.out)
    sizes = model_weight_bytes(model)
    seconds = time.perf_counter() - t0
    print(f"flute quantize: {args.method} {args.bits}-bit g{args.group_size} {args.codebook} "
          f"-> {args.out}")
    print(f"  before: {_mb(src_bytes)} on disk ({n_params / 1e6:.1f} M parameters, "
          f"{_mb(2 * n_params)} as fp16)")
    print(f"  after:  {_mb(out_bytes)} on disk (quantized layers {_mb(sizes['quantized'])}, "
          f"other tensors {_mb(sizes['other'])})")
    print(f"  time:   {seconds:.1f} s (quantization {model.flute_quantize_seconds:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    import os
    import time

    import torch

    from .evaluate import builtin_text, perplexity

    if args.window < 2:
        raise CliError(f"--window must be at least 2 tokens, got {args.window}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise CliError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.text and not os.path.isfile(args.text):
        raise CliError(f"text file {args.text} does not exist")
    for src in (args.model, args.baseline):
        if src is not None:
            _check_source(src)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # on CPU compute in float32 (the quantized layers keep their stored scales)
    dtype = torch.float32 if device == "cpu" else None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        text = builtin_text()
    results = []
    for label, src in (("model", args.model), ("baseline", args.baseline)):
        if src is None:
            continue
        t0 = time.perf_counter()
        model, tok = _load(src, dtype=dtype)
        model.to(device)
        ids = tok(text, return_tensors="pt")["input_ids"]
        if args.max_tokens:
            ids = ids[:, :args.max_tokens]
        with _fail_on(ValueError, f"cannot evaluate {src}"):
            ppl = perplexity(model, ids, window=args.window)
        quant = getattr(model.config, "quantization_config", None)
        q = {} if quant is None else quant if isinstance(quant, dict) else quant.to_dict()
        method = str(getattr(q.get("quant_method"), "value", q.get("quant_method")))
        if method == "flute":
            desc = (f"flute {q.get('bits')}-bit g{q.get('group_size')} {q.get('codebook')} "
                    f"{q.get('method')}")
        elif method == "gguf":
            desc = "dequantized from GGUF"
        else:
            desc = "unquantized" if quant is None else method
        print(f"{label:9s} {src}: perplexity {ppl:.3f} ({desc}; {ids.shape[1]} tokens, windows of "
              f"{args.window}, {time.perf_counter() - t0:.1f} s)", flush=True)
        results.append(ppl)
        del model
    if len(results) == 2:
        print(f"ratio model/baseline: {results[0] / results[1]:.4f} "
              f"(+{results[0] - results[1]:.3f} perplexity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
