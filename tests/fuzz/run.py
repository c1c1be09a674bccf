"""The fuzz suite's command line.

    python -m tests.fuzz.run --cases 50000              # the long run (ADR 0013 has its result)
    python -m tests.fuzz.run --cases 5000 --seed 12     # what CI runs (tests/fuzz/test_fuzz.py)
    python -m tests.fuzz.run --seed 12 --only 4711      # rebuild and run one case

Prints one JSON summary (counts, reasons, peak RSS, rate) and exits 1 unless crashes, hangs,
dead workers, memory and recursion faults are all zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Final

from tests.fuzz.crafted import crafted_cases
from tests.fuzz.harness import Report, run_cases
from tests.fuzz.mutate import mutated_cases
from tests.fuzz.seeds import all_seeds

#: The suite's own seed (CI); change it only together with the ADR's recorded run.
DEFAULT_SEED: Final = 12


def cases(
    count: int, seed: int, *, crafted: bool = True, only: int | None = None
) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """The hand-made cases first, then ``count`` mutations of the seed corpus."""
    seeds = all_seeds()
    if only is not None:
        yield from mutated_cases(seeds, 1, seed, start=only)
        return
    if crafted:
        yield from crafted_cases().items()
    yield from mutated_cases(seeds, count, seed)


def run(
    count: int, seed: int = DEFAULT_SEED, *, workers: int = 2, crafted: bool = True, only: int | None = None
) -> Report:
    step = max(1000, count // 10)

    def progress(done: int) -> None:
        if done % step == 0:
            print(f"... {done} cases", file=sys.stderr, flush=True)

    return run_cases(cases(count, seed, crafted=crafted, only=only), workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000, help="mutated cases (the crafted ones come on top)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--workers", type=int, default=2, help="decode worker processes")
    parser.add_argument("--no-crafted", action="store_true", help="mutations only")
    parser.add_argument("--only", type=int, default=None, help="run the one mutated case with this index")
    args = parser.parse_args(argv)
    report = run(args.cases, args.seed, workers=args.workers, crafted=not args.no_crafted, only=args.only)
    print(json.dumps({"seed": args.seed, **report.summary()}, indent=2))
    return 0 if report.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
