"""Batch results through the outbox (``dxassist screen ... --out DIR --deliver``).

A batch job's results reach the EMR and the PACS exactly as online ones do: each newly screened
study is committed to the results database with its evidence headers and one outbox row per
configured sink (FHIR, HL7 v2, DICOM store-back) in one transaction (``ResultsStore.finish_job``,
with a job row whose provenance says ``batch``), and the same ``OutboxWorker`` delivers them with
its retries, leases and dead letters. The job's ledger records a study before its result is
committed, so a resumed job never queues a study twice; rows still pending when the job ends
(a receiver down) stay in the outbox for the service or the next ``--deliver`` run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from models.errors import InferenceFailed, ResultsConflict
from models.results import OutcomeValues, ScreeningResult
from serving.core.screening import ModelOutputs, PreparedImage, StudyScreener
from serving.delivery.worker import OutboxWorker, Sink
from serving.dicom.seg import build_seg
from serving.persistence.ids import new_screening_uuid
from serving.persistence.outbox import Outbox
from serving.persistence.results import Finished, Provenance, ResultsStore
from serving.settings import DELIVERY_LEASE_S

logger = logging.getLogger(__name__)


def sinks_for(result: ScreeningResult, sinks: Mapping[str, Sink]) -> list[str]:
    """The outbox rows a result gets: every sink when SCREENED, those that report it otherwise
    (the same rule as the online service)."""
    return [
        name
        for name, sink in sinks.items()
        if result.outcome == OutcomeValues.SCREENED or getattr(sink, "reports_not_screened", False)
    ]


def record_for_delivery(
    store: ResultsStore,
    result: ScreeningResult,
    provenance: Provenance,
    paired: Sequence[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
    sinks: Mapping[str, Sink],
    screener: StudyScreener,
    job_id: str | None = None,
) -> None:
    """Commit the job, the result, its evidence headers (and SEG when results go back to the
    PACS) and its outbox rows together: one durable commit.

    With ``job_id`` (the ledger's, stable across reruns) it is idempotent: a job already DONE
    keeps its one result and outbox rows (a rerun after a crash that came between this commit
    and the ledger's)."""
    job_id = job_id or new_screening_uuid()
    evidence = [image.header for image, _ in paired if image.header is not None]
    if "dicom-sr" in sinks:  # masks exist only now: their SEG travels with the evidence
        evidence += build_seg(result, paired, screener.loaded)
    finished = Finished(result, evidence, sinks_for(result, sinks))
    uid = result.study_instance_uid or None
    try:
        store.add_job(job_id, "routine", uid, None, provenance=provenance, finished=finished)
    except ResultsConflict:  # the job exists (a rerun): finish it, or find it finished, once
        store.finish_job(job_id, result, evidence=evidence, sinks=finished.sinks)


def deliver_pending(
    store: ResultsStore, sinks: Mapping[str, Sink], timeout_s: float, lease_s: float = DELIVERY_LEASE_S
) -> tuple[int, int]:
    """Run the outbox worker until nothing is pending or ``timeout_s`` passed; returns
    (pending, dead) left. Rows backing off after a failure become due at their time."""
    outbox = Outbox(store.target, lease_s=lease_s)
    worker = OutboxWorker(outbox, dict(sinks), store.for_delivery)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            worker.run_once()
            status = outbox.status()
            if status.pending == 0 or time.monotonic() >= deadline:
                return status.pending, status.dead
            time.sleep(0.2)
    finally:
        outbox.close()
        for sink in sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()
