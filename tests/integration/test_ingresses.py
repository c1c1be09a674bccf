"""Several ingresses on one results database (issue #19, ADR 0021): two ``ScreeningService``
instances (plain classes, no Ray) share one SQLite file, then one real PostgreSQL.

Counted at the database (screenings, jobs, uploads), at the pipelines (prepare calls per job)
and at a real HL7 MLLP listener (messages and distinct MSH-10): every job screened once and
delivered once; jobs are claimed with leases; the poller runs in one instance and moves to the
other when the first drains; delivery ids derive from the job; uploads are kept in the database
so that an instance that never saw the upload screens it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from models.errors import UploadUnavailable
from models.predictor import OnnxPredictor
from serving.core.screening import ModelOutputs, StudyScreener
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.hl7 import Hl7MllpSink
from serving.emr.hl7_messages import message_control_id
from serving.online.pipeline import LocalPipeline, PreparedStudy, StudyRequest
from serving.online.service import ROLE_POLLER, PriorityValues, ScreeningService, job_result_id
from serving.persistence.leases import Leases
from serving.persistence.outbox import Outbox
from serving.persistence.results import Claim, Provenance, ResultsStore
from serving.persistence.schema import SourceValues, TriggerValues
from serving.settings import ApiSettings, PollerSettings, SiteIdentity
from tests.conformance.receivers import MllpListener, mllp_listener
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer

pytestmark = pytest.mark.integration
IDENTITY = SiteIdentity()
PACS = Provenance(SourceValues.PACS_FETCH, TriggerValues.POLLER)
UPLOAD = Provenance(SourceValues.UPLOAD, TriggerValues.API)


class CountingPipeline:
    """The real LocalPipeline; counts which requests each instance prepared."""

    def __init__(self, inner: LocalPipeline) -> None:
        self.inner = inner
        self.prepared: list[str] = []

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        self.prepared.append(request.study_instance_uid or "")
        return await self.inner.prepare_study(request)

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        return await self.inner.infer(model_id, tensors)

    async def model_info(self) -> list[dict[str, object]]:
        return await self.inner.model_info()


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _settings(tmp_path: Path, name: str, **overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "spool_dir": tmp_path / f"spool-{name}",  # each "node" its own disk
        "max_inflight": 2,
        "claim_interval_s": 0.05,
        "job_lease_s": 30.0,
    }
    return ApiSettings.model_validate(values | overrides)


def _service(
    db: Path | str,
    tmp_path: Path,
    name: str,
    screener: StudyScreener,
    store_dir: Path,
    listener: MllpListener,
    **kwargs: object,
) -> tuple[ScreeningService, CountingPipeline]:
    pipeline = CountingPipeline(LocalPipeline(screener, LocalFolderSource(store_dir)))
    sink = Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=5)
    service = ScreeningService(
        pipeline,
        screener,
        ResultsStore(db),
        _settings(tmp_path, name),
        sinks={"hl7": sink},
        **kwargs,  # type: ignore[arg-type]
    )
    return service, pipeline


async def _until(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.fixture
def listener() -> Iterator[MllpListener]:
    with mllp_listener() as server:
        yield server


def test_two_ingresses_screen_and_deliver_every_queued_job_once(
    results_db: Path | str, predictor: OnnxPredictor, tmp_path: Path, listener: MllpListener
) -> None:
    """Was: 62 jobs queued, the app redeployed with 2 ingresses: all 62 screened twice and
    delivered twice with different MSH-10; uploads whose spool was on the other node ended
    NOT_SCREENED. Here: 12 store jobs and 6 uploads left queued by a stopped process (their
    upload spool folders are gone with it), then two instances start at once."""
    store_dir = tmp_path / "store"
    paths = [write_synthetic_cxr(store_dir / f"s{i}.dcm", seed=500 + i) for i in range(12)]
    uploads = [write_synthetic_cxr(tmp_path / "up" / f"u{i}.dcm", seed=600 + i) for i in range(6)]
    seed = ResultsStore(results_db)
    for i, path in enumerate(paths):
        seed.add_job(f"job-s{i:02d}", "routine", uid_of(path), None, provenance=PACS, dedupe_key=uid_of(path))
    for i, path in enumerate(uploads):
        seed.add_job(f"job-u{i:02d}", "stat", uid_of(path), None, provenance=UPLOAD, files=[path.read_bytes()])
    job_ids = [f"job-s{i:02d}" for i in range(12)] + [f"job-u{i:02d}" for i in range(6)]
    screener = StudyScreener([predictor], study_ref_key=b"k")
    a, pipe_a = _service(results_db, tmp_path, "a", screener, store_dir, listener)
    b, pipe_b = _service(results_db, tmp_path, "b", screener, store_dir, listener)

    async def scenario() -> None:
        await asyncio.gather(a.start(), b.start())
        # and new work admitted at both while they drain the backlog
        extra = [write_synthetic_cxr(tmp_path / "more" / f"m{i}.dcm", seed=700 + i) for i in range(4)]
        for i, path in enumerate(extra):
            svc = a if i % 2 else b
            job_ids.append(await asyncio.to_thread(svc.submit_upload, [path.read_bytes()], PriorityValues.ROUTINE))
        outbox = Outbox(results_db)
        try:

            def finished() -> bool:
                return all(seed.job(j).status == "DONE" for j in job_ids)  # type: ignore[union-attr]

            await _until(finished, 120, "every job DONE")
            await _until(lambda: outbox.status().pending == 0 and len(listener.accepted) >= 22, 60, "all delivered")
            await asyncio.sleep(0.5)  # a late duplicate would arrive now
        finally:
            outbox.close()
            await asyncio.gather(a.drain(10), b.drain(10))

    try:
        asyncio.run(scenario())
    finally:
        a.close()
        b.close()
    prepared = Counter(pipe_a.prepared + pipe_b.prepared)
    assert sum(prepared.values()) == 22 and set(prepared.values()) == {1}  # screened once each
    assert pipe_a.prepared and pipe_b.prepared  # both ingresses took part
    assert seed.count() == 22
    records = [seed.job(j) for j in job_ids]
    assert all(r is not None and r.status == "DONE" and r.screening_id for r in records)
    results = [seed.result(r.screening_id) for r in records if r is not None and r.screening_id]
    assert all(r is not None and r.outcome == "SCREENED" for r in results)  # none NOT_SCREENED: no spool needed
    assert all(seed.upload_files(j) == [] for j in job_ids)  # deleted with their results
    # the receiver's view: 22 messages, 22 distinct MSH-10, each the one derived from its job
    assert len(listener.received) == 22 and len(set(listener.received)) == 22
    expected = {
        message_control_id(r.model_copy(update={"result_id": job_result_id(j)}), "hl7")
        for j, r in zip(job_ids, results, strict=True)
        if r is not None
    }
    assert set(listener.received) == expected
    seed.close()


def test_jobs_are_claimed_with_leases(results_db: Path | str) -> None:
    store = ResultsStore(results_db)
    for i in range(40):
        store.add_job(f"j{i:02d}", "routine", f"1.2.{i}", None, provenance=PACS, dedupe_key=f"1.2.{i}")
    store.add_job("held", "routine", "1.3", None, provenance=PACS, claim=Claim("alive", 60))
    store.add_job("stale", "routine", "1.4", None, provenance=PACS, claim=Claim("dead", -1))  # lease over

    claimed: list[list[str]] = []

    def claimer(n: int) -> None:
        other = ResultsStore(results_db)
        mine: list[str] = []
        while batch := other.claim_jobs(Claim(f"ingress-{n}", 60), 3):
            mine += [j.id for j in batch]
        claimed.append(mine)
        other.close()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [j for mine in claimed for j in mine]
    assert len(every) == len(set(every)) == 41  # disjoint; the stale lease taken over, the live one not
    assert "held" not in every and "stale" in every
    stale = store.job("stale")
    assert stale is not None and stale.attempts == 2 and stale.claimed_by != "dead"

    # the holder renews; another holder cannot; a finished job is neither renewed nor claimed again
    owner = stale.claimed_by
    assert owner is not None
    assert store.renew_jobs(Claim(owner, 60), ["stale", "held"]) == {"stale"}
    assert store.renew_jobs(Claim("alive", 60), ["held"]) == {"held"}
    first = store.finish_job("stale", _result("1.4", "first"))
    second = store.finish_job("stale", _result("1.4", "second"))  # a second screening of the same job
    assert first == second and len(store.screenings_for("1.4")) == 1
    assert store.result(first).reason_detail == "first"  # type: ignore[union-attr]  # never overwritten
    store.update_job("stale", "FAILED", error_reason="TIMEOUT")  # a late failure does not undo the result
    assert store.job("stale").status == "DONE"  # type: ignore[union-attr]
    assert store.renew_jobs(Claim(owner, 60), ["stale"]) == set()
    assert store.release_jobs("alive", ["held"]) == 1
    assert [j.id for j in store.claim_jobs(Claim("next", 60), 10)] == ["held"]  # released: claimable at once
    store.close()


def _result(uid: str, detail: str):  # type: ignore[no-untyped-def]
    from models.errors import ReasonCode
    from models.results import ScreeningResult

    return ScreeningResult(
        study_instance_uid=uid,
        study_ref="r",
        outcome="NOT_SCREENED",
        reason=ReasonCode.NO_USABLE_IMAGE,
        reason_detail=detail,
    )


def test_role_leases_elect_one_holder_and_hand_over_after_expiry(results_db: Path | str) -> None:
    a, b = Leases(results_db), Leases(results_db)
    assert a.acquire("poller", "A", 60) is True
    assert b.acquire("poller", "B", 60) is False
    assert a.acquire("poller", "A", 60) is True  # renewal
    assert a.holder("poller").term == 1  # type: ignore[union-attr]
    assert a.acquire("poller", "A", -1) is True  # a renewal that ends at once: A stopped renewing
    assert b.acquire("poller", "B", 60) is True  # B takes over after expiry
    held = b.holder("poller")
    assert held is not None and (held.holder, held.term) == ("B", 2)
    assert a.acquire("poller", "A", 60) is False
    b.release("poller", "B")
    assert a.acquire("poller", "A", 60) is True  # released on drain: taken at once
    a.close()
    b.close()


class CountingSearch:
    """A real DICOMweb source; counts the QIDO-RS searches made through it."""

    def __init__(self, real: DicomWebSource) -> None:
        self.real = real
        self.searches = 0

    def search_studies(self, **kwargs: str | None) -> list[str]:
        self.searches += 1
        return self.real.search_studies(**kwargs)  # type: ignore[arg-type]

    def instances(self, study_instance_uid: str):  # type: ignore[no-untyped-def]
        return self.real.instances(study_instance_uid)


def test_the_poller_runs_in_one_instance_and_moves_when_it_drains(
    results_db: Path | str, predictor: OnnxPredictor, tmp_path: Path, orthanc: OrthancServer, listener: MllpListener
) -> None:
    """Was: with the poller and 2 ingresses, 6 of 30 studies were delivered twice."""
    manifest = predictor.manifest
    paths = [write_synthetic_cxr(tmp_path / "pacs" / f"p{i}.dcm", seed=800 + i) for i in range(4)]
    for path in paths[:2]:
        orthanc.upload(path)

    opened: list[DicomWebSource] = []

    def source() -> DicomWebSource:
        opened.append(
            DicomWebSource(
                orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=[manifest], timeout_s=10
            )
        )
        return opened[-1]

    screener = StudyScreener([predictor], study_ref_key=b"k")
    poller = PollerSettings(enabled=True, interval_s=0.1, modalities=["CR"], lookback_days=36500)
    searches = [CountingSearch(source()), CountingSearch(source())]
    services = []
    for name, search in zip("ab", searches, strict=True):
        pipeline = CountingPipeline(LocalPipeline(screener, source()))
        service = ScreeningService(
            pipeline,
            screener,
            ResultsStore(results_db),
            _settings(tmp_path, name, leader_lease_s=1.0),
            sinks={"hl7": Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=5)},
            poller=poller,
            poll_source=search,  # type: ignore[arg-type]
        )
        services.append(service)
    a, b = services
    store = ResultsStore(results_db)

    async def scenario() -> None:
        await asyncio.gather(a.start(), b.start())
        leaders = [s for s in services if s.leads(ROLE_POLLER)]
        assert len(leaders) == 1
        leader, other = leaders[0], (b if leaders[0] is a else a)
        idle = searches[services.index(other)]
        await _until(lambda: len(listener.accepted) == 2, 60, "first two studies delivered")
        await asyncio.sleep(1.0)  # several more sweeps and lease renewals
        assert idle.searches == 0 and searches[services.index(leader)].searches >= 3
        assert not other.leads(ROLE_POLLER)

        await leader.drain(10)  # the leader stops: the other takes the poller over
        for path in paths[2:]:
            orthanc.upload(path)
        await _until(lambda: other.leads(ROLE_POLLER), 10, "the poller moves to the other instance")
        await _until(lambda: len(listener.accepted) == 4, 60, "the next two studies delivered")
        await asyncio.sleep(0.5)
        assert idle.searches > 0
        await other.drain(10)

    try:
        asyncio.run(scenario())
    finally:
        for service in services:
            service.close()
        for opened_source in opened:
            opened_source.close()
    assert store.count() == 4 and len(listener.received) == 4 == len(set(listener.received))
    for path in paths:
        assert len(store.jobs_of_study(uid_of(path))) == 1
    store.close()


def test_an_upload_is_read_from_the_database_by_an_instance_that_never_saw_it(
    results_db: Path | str, predictor: OnnxPredictor, tmp_path: Path, listener: MllpListener
) -> None:
    """Was: an upload whose spool folder was not on the screening node ended "DONE, not
    screened, none of 0 images" and the upload was deleted. Here the admitting instance drains
    before screening it (its spool folder is gone: another node's disk); the other screens it
    from the database. An upload that cannot be read at all is retried, then FAILED
    UPLOAD_UNAVAILABLE: never a NOT_SCREENED result."""
    screener = StudyScreener([predictor], study_ref_key=b"k")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    data = write_synthetic_cxr(tmp_path / "u.dcm", seed=901).read_bytes()
    a, _pa = _service(results_db, tmp_path, "a", screener, store_dir, listener)
    b, pipe_b = _service(results_db, tmp_path, "b", screener, store_dir, listener)
    store = ResultsStore(results_db)

    async def scenario() -> str:
        await a.start()
        a._dispatcher.cancel()  # type: ignore[union-attr]  # admits but never screens (as if it died next)
        job_id = await asyncio.to_thread(a.submit_upload, [data], PriorityValues.ROUTINE)
        assert store.upload_files(job_id) == [data]
        assert not any((tmp_path / "spool-a").iterdir())  # nothing left on a's disk
        await a.drain(1)  # gives its queued job back
        await b.start()
        await b.wait_for(job_id, 60)
        await b.drain(10)
        return job_id

    try:
        job_id = asyncio.run(scenario())
    finally:
        a.close()
        b.close()
    record = store.job(job_id)
    assert record is not None and record.status == "DONE" and record.screening_id
    assert store.result(record.screening_id).outcome == "SCREENED"  # type: ignore[union-attr]
    assert pipe_b.prepared and store.upload_files(job_id) == []

    # an upload job whose instances are gone: retried (each attempt a claim), then FAILED
    store.add_job("lost", "routine", None, None, provenance=UPLOAD)
    c, pipe_c = _service(results_db, tmp_path, "c", screener, store_dir, listener)
    c.settings = c.settings.model_copy(update={"max_job_claims": 2, "job_lease_s": 1.0})

    async def lost() -> None:
        await c.start()
        await _until(lambda: store.job("lost").status == "FAILED", 90, "the lost upload fails")  # type: ignore[union-attr]
        await c.drain(5)

    try:
        asyncio.run(lost())
    finally:
        c.close()
    failed = store.job("lost")
    assert failed is not None and (failed.error_reason, failed.attempts, failed.screening_id) == (
        "UPLOAD_UNAVAILABLE",
        2,
        None,
    )
    assert pipe_c.prepared == []  # nothing was screened as "none of 0 images"
    store.close()


def test_an_old_jobs_spool_folder_missing_here_is_unavailable_not_an_empty_study(
    predictor: OnnxPredictor, tmp_path: Path
) -> None:
    from serving.online.pipeline import prepare_request

    screener = StudyScreener([predictor], study_ref_key=b"k")
    with pytest.raises(UploadUnavailable):
        prepare_request(
            screener, LocalFolderSource(tmp_path), StudyRequest(spool_dir=str(tmp_path / "on-another-node"))
        )


def test_a_holder_of_this_host_whose_process_is_gone_is_taken_over_at_once(results_db: Path | str) -> None:
    """A replica restarted after ``kill -9`` resumes its predecessor's jobs and roles without
    waiting for their leases; a live holder (this process's other instance) keeps them."""
    import subprocess
    import sys

    from serving.persistence.leases import holder_is_dead, new_holder, retire_holder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    alive = new_holder()
    host = alive.split(":")[0]
    dead = f"{host}:{int(gone.stdout)}:deadbeef"
    retired = new_holder()
    retire_holder(retired)  # an instance of this process that closed
    assert holder_is_dead(dead) and holder_is_dead(retired)
    assert not holder_is_dead(alive) and not holder_is_dead(f"other-host:{int(gone.stdout)}:x")

    store = ResultsStore(results_db)
    store.add_job("of-dead", "routine", "1.5", None, provenance=PACS, claim=Claim(dead, 600))
    store.add_job("of-alive", "routine", "1.6", None, provenance=PACS, claim=Claim(alive, 600))
    holders = store.job_holders()
    assert holders == {dead, alive}
    found = sorted(h for h in holders if holder_is_dead(h))
    assert [j.id for j in store.claim_jobs(Claim("new", 60), 10, dead=found)] == ["of-dead"]
    leases = Leases(results_db)
    assert leases.acquire("scp", dead, 600, is_dead=lambda _h: False)
    assert leases.acquire("scp", "new", 600)  # its holder is gone: taken now, not in 10 minutes
    assert not leases.acquire("scp", alive, 600)  # "new" is not of this host's form: it waits
    retire_holder(alive)
    leases.close()
    store.close()


def test_delivery_ids_derive_from_the_job_not_from_the_screening(predictor: OnnxPredictor, tmp_path: Path) -> None:
    """Two screenings of one job (at-least-once inside the cluster) carry the same delivery ids,
    so the receiver drops the second; another job never shares them."""
    from serving.core.screening import screen_paths
    from serving.emr.fhir_resources import report_id

    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=950)
    screener = StudyScreener([predictor], study_ref_key=b"k")
    first, second = (screen_paths(screener, [path])[0] for _ in range(2))
    assert first.result_id != second.result_id  # the screening core's own ids are random

    def as_service_stores(result, job_id: str):  # type: ignore[no-untyped-def]
        return result.model_copy(update={"result_id": job_result_id(job_id)})

    job = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    a, b = as_service_stores(first, job), as_service_stores(second, job)
    assert message_control_id(a, "hl7") == message_control_id(b, "hl7")
    assert report_id(a) == report_id(b)  # FHIR: PUT to the same id
    other = as_service_stores(first, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c")
    assert message_control_id(other, "hl7") != message_control_id(a, "hl7")
    assert job_result_id(job) == job_result_id(job) and len(job_result_id(job)) == 32
