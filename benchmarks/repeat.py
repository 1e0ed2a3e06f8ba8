"""Run a benchmark several times and report every figure as median and range (these machines are
noisy: a goal is met only when the whole range clears it).

Usage: python -m benchmarks.repeat NAME [--runs 3] [-- ARGS...]
Runs ``python -m benchmarks.NAME ARGS`` ``--runs`` times in fresh processes, reads each run's
JSON (``benchmarks/out/NAME.json``, or the one file the run wrote where its name carries the
run's settings), prints one row per row of the benchmark's table with each number as
``median [min-max]``, and writes ``benchmarks/out/NAME-repeated.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import OUT, machine


def repeated(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Row i of every run merged: text columns as they are (they must agree), numbers as
    ``{"median", "min", "max", "runs"}``."""
    if len({len(rows) for rows in runs}) != 1:
        raise ValueError(f"the runs' tables differ in length: {[len(rows) for rows in runs]}")
    merged = []
    for same in zip(*runs):
        row: dict[str, Any] = {}
        for key in dict.fromkeys(k for r in same for k in r):
            values = [r.get(key) for r in same]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                            "runs": values}
            else:
                row[key] = values[0] if len(set(map(str, values))) == 1 else values
        merged.append(row)
    return merged


def _written(name: str, since: float) -> Path:
    """The JSON a run of benchmark ``name`` wrote after ``since``."""
    fresh = [p for p in OUT.glob(f"{name}*.json") if p.stat().st_mtime >= since and "-repeated" not in p.name]
    if len(fresh) != 1:
        raise RuntimeError(f"benchmarks.{name} wrote {len(fresh)} JSON file(s) to {OUT}, expected 1")
    return fresh[0]


def _cell(value: Any) -> str:
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:.4g} [{value['min']:.4g}-{value['max']:.4g}]"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a benchmark module in benchmarks/, e.g. sim_overhead")
    parser.add_argument("--runs", type=int, default=3)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1:]  # the benchmark's own arguments
    runs, extras = [], []
    for i in range(args.runs):
        print(f"--- run {i + 1}/{args.runs}: python -m benchmarks.{args.name} {' '.join(extra)}", flush=True)
        started = time.time()
        subprocess.run([sys.executable, "-m", f"benchmarks.{args.name}", *extra], check=True)
        result = json.loads(_written(args.name, started).read_text())
        runs.append(result.pop("rows"))
        extras.append(result)
    rows = repeated(runs)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{args.name}, {args.runs} runs: median [min-max]")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    path = OUT / f"{args.name}-repeated.json"
    path.write_text(json.dumps({"rows": rows, "runs": extras, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
