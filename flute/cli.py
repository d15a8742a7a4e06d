"""The ``flute`` command line: ``flute demo``, ``flute bench`` (and the subcommands below)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after "bench" goes to the suite's own parser
        from .benchmark import main as bench_main
        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="flute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize SmolLM2-135M at 4 and 3 bits and report size, "
                                       "perplexity and speed")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    demo.add_argument("--group-size", type=int, default=64)
    demo.add_argument("--tokens", type=int, default=32, help="tokens to generate per timing")
    sub.add_parser("bench", help="kernel and end-to-end benchmarks (flute bench --help)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(device=args.device, bits=args.bits, group_size=args.group_size,
                        new_tokens=args.tokens)
    return 2


if __name__ == "__main__":
    sys.exit(main())
