#!/usr/bin/env python
"""End-to-end generate benchmark: ``python benchmarks/e2e.py [options]`` is
``python benchmarks/bench.py --e2e [options]`` (options: ``--e2e-bits``, ``--e2e-batch``,
``--e2e-layers``, ``--e2e-prefill``, ``--device``, ``--out``; see ``bench.py --help``)."""
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flute.bench import main as _main  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return _main(["--e2e"] + [a for a in argv if a != "--e2e"])


if __name__ == "__main__":
    sys.exit(main())
