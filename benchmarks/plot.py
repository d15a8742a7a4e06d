#!/usr/bin/env python
"""Draw the PNGs of benchmark results: ``python benchmarks/plot.py RESULT.json [...] [--out DIR]``.

Writes ``<stem>_speedup.png`` and ``<stem>_roofline.png`` (kernel sweeps) or ``<stem>_e2e.png``
(end-to-end runs) next to each JSON, or into ``--out``. Needs matplotlib (the GPU machine may lack
it: the suite always writes the JSON, and this script draws the plots later, anywhere).
"""
import argparse
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flute.bench.plots import plot_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files written by bench.py")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: beside each JSON)")
    args = p.parse_args(argv)
    status = 0
    for path in args.results:
        written = plot_results(path, args.out)
        if not written:
            print(f"{path}: nothing drawn (matplotlib missing, or no points)", file=sys.stderr)
            status = 1
        for w in written:
            print(w)
    return status


if __name__ == "__main__":
    sys.exit(main())
