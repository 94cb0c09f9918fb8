"""How long the synthetic world takes to build (the demo's and the test suite's first step).

Prints one JSON line: wall seconds, bytes on disk per part and the record counts, with the machine.
The tiny world's build is what `make demo` and the tests pay first; the README promises it in well
under a minute on 2 cores, and this is where that figure is measured (tests never time anything).

    .venv/bin/python benchmarks/world.py --size tiny --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info

from mm1.data.world import build_world
from mm1.data.world.build import WORLD_SIZES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=sorted(WORLD_SIZES), help="world size (default tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="build processes (default: all cores)")
    p.add_argument("--scale", type=float, default=1.0, help="scale the size's counts (e.g. 0.05 for a smoke run)")
    args = p.parse_args(argv)

    size = WORLD_SIZES[args.size]
    if args.scale != 1.0:
        size = size.scaled(args.scale)
    with tempfile.TemporaryDirectory(prefix="mm1-world-bench-") as tmp:
        start = time.perf_counter()
        manifest = build_world(Path(tmp) / "world", size, seed=args.seed, workers=args.workers, verbose=False)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "benchmark": "world",
                "size": size.name,
                "seed": args.seed,
                "workers": args.workers,
                "seconds": round(seconds, 2),
                "bytes": manifest["bytes"],
                "counts": manifest["counts"],
                "machine": machine_info(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
