#!/usr/bin/env python
"""Check benchmark results against the acceptance targets of ``benchmarks/targets.py``:
``python benchmarks/check_targets.py RESULT.json [...] [--write] [--strict]``.

Prints one PASS / MISS / n/a line per target. ``--write`` stores the evaluation in the file's
``targets`` (as ``flute bench`` does when it runs from a checkout); ``--strict`` exits 1 on any MISS.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, HERE)

import targets  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files written by flute bench")
    p.add_argument("--write", action="store_true", help="store the evaluation in each file")
    p.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    args = p.parse_args(argv)
    missed = False
    for path in args.results:
        with open(path) as f:
            doc = json.load(f)
        rows = targets.evaluate(doc)
        print(f"== {path}\n{targets.table(rows)}")
        missed |= any(r["pass"] is False for r in rows)
        if args.write:
            doc["targets"] = rows
            doc["targets_note"] = "thresholds from benchmarks/targets.py (check_targets.py)"
            with open(path + ".tmp", "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            os.replace(path + ".tmp", path)
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
