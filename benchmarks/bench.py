#!/usr/bin/env python
"""The flute benchmark suite: ``python benchmarks/bench.py [--quick|--full|--e2e] [--device cpu] ...``.

A thin script: the suite lives in :mod:`flute.bench` (importable, tested, and behind
``flute bench``). ``python benchmarks/bench.py --help`` lists every option.
"""
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run from a checkout without installing: make the repository's flute importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flute.bench import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
