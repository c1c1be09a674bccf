"""The fuzz suite in CI: the hand-made hostile files plus 5,000 seeded mutations of the seed
corpus, through the decode boundary in worker processes. Zero crashes, hangs, dead workers,
memory or recursion faults; every case ends as SCREENED or a typed reason.

The long run is ``python -m tests.fuzz.run --cases 50000`` (result in docs/adr/0013).
"""

from __future__ import annotations

from models.errors import ReasonCode
from tests.fuzz.crafted import crafted_cases
from tests.fuzz.run import DEFAULT_SEED, run

CI_CASES = 5000


def test_fuzz_suite_has_no_crash_hang_dead_worker_or_memory_fault() -> None:
    report = run(CI_CASES, DEFAULT_SEED, workers=2)
    summary = report.summary()
    assert report.cases == CI_CASES + len(crafted_cases()), summary
    assert (report.crashes, report.hangs, report.dead_workers, report.memory, report.recursion) == (0, 0, 0, 0, 0), (
        summary["failures"]
    )
    assert report.unexpected == 0, summary["failures"]
    # every outcome is a screening or a typed reason the EMR understands
    assert set(report.reasons) <= {"SCREENED", *(r.value for r in ReasonCode)}
    # the mutations reach the decoders: a real share is still screened, a real share is refused
    assert report.screened > CI_CASES // 10
    assert report.reasons["DECODE_FAILED"] > CI_CASES // 20
