"""The online screening service as a plain asyncio class (no Ray, no HTTP).

``ScreeningService`` admits requests into two bounded queues (``stat`` before ``routine``),
persists each request as a job before acknowledging it, screens with a bounded number of studies
in flight (one slot always kept free for ``stat``), applies a per-request timeout, and records
results in the results store in the same transaction that marks the job done. On start it
resumes jobs a previous process left unfinished; ``drain`` stops admission and waits for the
work in flight.

Any number of instances (ingresses, on any nodes) may share one results database (ADR 0021):

* each job is *claimed* with a lease (``jobs.claimed_by``/``lease_until``): the admitting
  instance holds it, renews the lease while it is queued or running there, and gives it back on
  drain; an instance claims only jobs nobody holds (left by an older version, released, or whose
  lease ran out), so a job is screened by one instance, and a job finished by one is never
  screened by another. Should two ever screen it (a stalled instance whose lease was taken over),
  the store records the first result only, and both derive the same delivery ids from the job.
* uploads and pushed studies are kept in the results database (``uploads``) from admission to
  result, and travel with the request as bytes: no node reads another node's disk. Instances
  that cannot be read are ``UploadUnavailable``: the job is retried, never finished NOT_SCREENED.
* the C-STORE SCP, the QIDO-RS poller and the FHIR order poller run in one instance per
  database, the holder of a lease in ``leases`` (``serving.persistence.leases``).

The heavy work goes through a ``Pipeline``: ``LocalPipeline`` runs ``StudyScreener`` stages in
threads in this process; ``serving.rayserve.app`` provides one that calls Ray Serve deployments.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from models.errors import (
    InferenceFailed,
    JobFailureValues,
    QueueFull,
    ResultsDatabaseError,
    ServiceDraining,
    SourceError,
    StudyNotFound,
    UploadUnavailable,
)
from models.heap import keep_heap_for_reuse, trim_heap
from models.predictor import RUN_ALONE
from models.results import OutcomeValues, ScreeningResult
from serving.core.screening import ModelOutputs, PreparedImage, StudyScreener
from serving.core.uids import is_dicom_uid
from serving.delivery.worker import OutboxWorker, Sink
from serving.dicom.dimse import StoreScp, scp_tls_context
from serving.dicom.seg import build_seg
from serving.dicom.sources import SearchableSource
from serving.observability.metrics import ServiceMetrics
from serving.online.integrity import default_provenance, upload_hash, upload_study_uid
from serving.online.orders import FhirOrderPoller, OrderListener
from serving.online.pipeline import Pipeline, PreparedStudy, StudyRequest
from serving.online.spool import MemoryBudget, SpooledUpload, private_dir, sweep_partials
from serving.persistence.ids import new_screening_uuid
from serving.persistence.leases import Leases, holder_is_dead, new_holder, retire_holder
from serving.persistence.orders import Order, OrderBook, OrderPriorityValues, OrderRecord, OrderStatusValues
from serving.persistence.outbox import Outbox
from serving.persistence.results import Admission, Claim, Finished, Idempotency, JobRecord, Provenance, ResultsStore
from serving.persistence.schema import STORE_SOURCES, SYSTEM_ACTOR, SourceValues, TriggerValues
from serving.settings import DELIVERY_LEASE_S, ApiSettings, OrdersSettings, PollerSettings, ScpSettings

logger = logging.getLogger(__name__)


class PriorityValues(StrEnum):
    STAT = "stat"
    ROUTINE = "routine"


class JobStatusValues(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


@dataclass
class _Job:
    id: str
    priority: PriorityValues
    request: StudyRequest
    enqueued: float = field(default_factory=time.monotonic)
    provenance: Provenance | None = None
    dedupe_key: str | None = None  # the Study UID of a store-sourced job (serving.persistence.results)
    idempotency: Idempotency | None = None
    unless_screened: bool = False  # automatic triggers: no job when the store's copy was screened
    audit_action: str | None = None  # the API request that admitted it, audited in the same commit
    upload: tuple[bytes, ...] = ()  # instances to keep in the database at admission (then dropped here)
    kept: bool = False  # its instances are in the results database (``uploads``), read when it runs
    attempts: int = 1  # claims so far, this one included


@dataclass(eq=False)
class _SlotWaiter:
    """An upload waiting for a screening slot until ``deadline`` (``admit_upload``)."""

    job: _Job
    deadline: float
    started: asyncio.Future[None]
    answer: asyncio.Future[str] | None = None


@dataclass(frozen=True)
class _Failed:
    reason: JobFailureValues
    detail: str


@dataclass(frozen=True)
class _Unreadable:
    """The job's instances cannot be read here now (another node may read them)."""


#: how a screening ended: the result (and the seconds since it was queued), a failure, or unreadable
_Ended = tuple[Finished, float] | _Failed | _Unreadable


#: seconds without work after which the heap kept for reuse is given back (``models.heap``)
_IDLE_TRIM_S = 1.0

#: how many recently ended job ids ``wait_for`` knows without reading the database
_ENDED_REMEMBERED = 1024

#: roles that run in one instance per results database (``serving.persistence.leases``)
ROLE_SCP = "scp"
ROLE_POLLER = "poller"
ROLE_FHIR_ORDERS = "fhir-orders"


def job_result_id(job_id: str) -> str:
    """The ``result_id`` of a job's result: derived from the job, so a second screening of the
    same job (at-least-once inside) carries the same delivery ids (HL7 MSH-10, the SR's UIDs)
    and a receiver drops the duplicate; job ids are time-ordered random UUIDs, so no other
    screening, also in another database, shares it."""
    return hashlib.sha256(f"dxassist-job|{job_id}".encode()).hexdigest()[:32]


class ScreeningService:
    """Admission, priority, persistence and timeouts around a ``Pipeline``."""

    def __init__(
        self,
        pipeline: Pipeline,
        screener: StudyScreener,
        store: ResultsStore,
        settings: ApiSettings,
        metrics: ServiceMetrics | None = None,
        *,
        sinks: Mapping[str, Sink] | None = None,
        scp: ScpSettings | None = None,
        poller: PollerSettings | None = None,
        poll_source: SearchableSource | None = None,
        orders: OrdersSettings | None = None,
        delivery_lease_s: float = DELIVERY_LEASE_S,
    ) -> None:
        self.sinks = dict(sinks or {})
        #: inbound orders (serving.online.orders): their priority and order numbers reach the screening
        self.orders_settings = orders
        self.orders = OrderBook(store.target) if orders is not None else None
        self._order_listener: OrderListener | None = None
        self._order_poller: asyncio.Task[None] | None = None
        self._order_tasks: set[asyncio.Task[None]] = set()
        self.outbox = Outbox(store.target, lease_s=delivery_lease_s) if self.sinks else None
        self._delivery: asyncio.Task[None] | None = None
        self._trim_timer: asyncio.TimerHandle | None = None
        #: uploads being received are kept in memory while they all fit this (``serving.online.spool``)
        self.upload_memory = MemoryBudget(settings.upload_memory_bytes)
        self._trims: set[asyncio.Task[bool]] = set()
        self.scp_settings = scp
        self.poller_settings = poller
        self.poll_source = poll_source
        self._scp: StoreScp | None = None
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pipeline = pipeline
        self.screener = screener  # only ``assemble`` (cheap, pure) runs here
        self.store = store
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        # Admission runs in worker threads (its database commit must not block the event loop);
        # the queues live in the loop. Capacity is counted here, under a lock, as the jobs queued
        # plus those admitted but not yet handed to the loop.
        self._queues: dict[PriorityValues, asyncio.Queue[_Job]] = {p: asyncio.Queue() for p in PriorityValues}
        self._capacity = {
            PriorityValues.STAT: settings.max_queued_stat,
            PriorityValues.ROUTINE: settings.max_queued_routine,
        }
        self._handing: dict[PriorityValues, int] = dict.fromkeys(PriorityValues, 0)
        #: uploads whose clients wait, held in memory until a slot frees up (``admit_upload``)
        self._slot_waiters: dict[PriorityValues, collections.deque[_SlotWaiter]] = {
            p: collections.deque() for p in PriorityValues
        }
        self._slots = threading.Lock()
        self._running: set[str] = set()  # job ids being screened now (never persisted as such)
        self._loop_thread: int | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._done_events: dict[str, asyncio.Event] = {}
        #: the last jobs whose end (DONE or FAILED) this instance committed, oldest first
        self._ended: dict[str, None] = {}
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._draining = False
        self._drain_lock = asyncio.Lock()
        self._drained: bool | None = None
        #: the type of the last failed database write, None once a write succeeds again
        self._db_error: str | None = None
        self._models_ready = False
        self.ready = False
        #: this instance among the ingresses sharing the database: the holder of its job claims
        self.instance_id = new_holder()  # host:pid:random
        self._claim = Claim(self.instance_id, settings.job_lease_s)
        self._held: set[str] = set()  # jobs this instance claimed and has not finished
        self._lost: set[str] = set()  # claimed jobs whose lease another instance took over
        self._claims_task: asyncio.Task[None] | None = None
        self._leases: Leases | None = None
        self._leading: set[str] = set()  # the once-per-cluster roles this instance runs now
        self._leader_task: asyncio.Task[None] | None = None
        #: background loops started with the service and cancelled by ``drain`` (drift watch)
        self.periodic: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._periodic_tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Warm up (model self-test), sweep half-written uploads, resume unfinished jobs,
        start dispatching. Called at process start (not at the first request): resumed jobs
        move at once."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # upload and decode buffers reused from study to study, not faulted in afresh for each
        keep_heap_for_reuse()
        private_dir(self.settings.spool_dir)  # 0700: spooled instances are patient data
        swept = sweep_partials(self.settings.spool_dir)
        if swept:
            logger.info("removed %d partial uploads", swept)
        info = await self.pipeline.model_info()
        for m in info:
            self.metrics.model_info.labels(str(m["model"]), str(m["version"]), str(m["provider"])).set(1)
        # unfinished jobs nobody holds (a previous process's, released, or whose lease ran out):
        # claimed a window at a time, so that ingresses starting together share them
        resumed = await self._claim_more(look_for_dead=True)
        if resumed:
            logger.info("resumed %d unfinished screening jobs", resumed)
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._claims_task = asyncio.create_task(self._claims_forever())
        roles = self._roles()
        if roles:  # the SCP and the pollers: in the one instance that holds their lease
            self._leases = Leases(self.store.target)
            await self._lead_once(roles, at_start=True)
            self._leader_task = asyncio.create_task(self._lead_forever(roles))
        if self.orders is not None and self.orders_settings is not None and self.orders_settings.hl7.enabled:
            self._order_listener = OrderListener(self.orders, self.orders_settings, self.on_orders)
            await self._order_listener.start()
        if self.outbox is not None:  # also delivers what a previous process left pending
            self._delivery = asyncio.create_task(self._deliver_forever())
        self._periodic_tasks = [asyncio.create_task(loop()) for loop in self.periodic]
        self._models_ready = all(bool(m["ready"]) for m in info)
        self.ready = self._models_ready

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Stop admitting at once (from here ``submit`` raises ``ServiceDraining``: 503 with
        Retry-After), wait up to ``timeout_s`` for the studies in flight; queued jobs, and any
        still running at the deadline, stay persisted and resume at the next start. Returns
        True when nothing was left running. Calling it again waits for the first call."""
        self._draining = True
        self.ready = False
        async with self._drain_lock:
            if self._drained is None:
                self._drained = await self._drain(timeout_s)
            return self._drained

    async def _drain(self, timeout_s: float) -> bool:
        if self._order_listener is not None:  # stored orders stay; senders retry what was not ACKed
            await self._order_listener.stop()
        if self._leader_task is not None:
            self._leader_task.cancel()
        for role in sorted(self._leading):  # stopped, then handed on: another instance takes them now
            await self._stop_role(role)
        if self._leases is not None:
            try:
                for role in self._roles():
                    await asyncio.to_thread(self._leases.release, role, self.instance_id)
            except ResultsDatabaseError as exc:  # the lease runs out on its own
                logger.warning("role leases not released (%s)", type(exc).__name__)
        if self._claims_task is not None:
            self._claims_task.cancel()
        for task in self._periodic_tasks:
            task.cancel()
        if self._dispatcher:
            self._dispatcher.cancel()
        for waiters in self._slot_waiters.values():  # uploads not admitted: their clients get a 503 now
            while waiters:
                waiter = waiters.popleft()
                if not waiter.started.done():
                    waiter.started.set_exception(ServiceDraining())
        queued: list[str] = []
        for queue in self._queues.values():  # queued jobs run later, here or elsewhere: answer their waiters now
            while not queue.empty():
                job_id = queue.get_nowait().id
                queued.append(job_id)
                self._signal_done(job_id)
        await self._release(queued)  # another ingress may take them at once
        finished = True
        if self._inflight:
            _done, pending = await asyncio.wait(self._inflight, timeout=timeout_s)
            finished = not pending
        await self._release(sorted(self._held))  # still running at the deadline: its lease would end anyway
        if self._delivery is not None:
            # the delivery loop sees ``_draining`` after its current pass; sinks close only then,
            # never under a send (a row left mid-send stays claimed and falls due after its lease)
            _done, pending = await asyncio.wait([self._delivery], timeout=timeout_s)
            for task in pending:
                task.cancel()
        for sink in self.sinks.values():
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        if self.outbox is not None and self._delivery is not None and self._delivery.done():
            self.outbox.close()
        return finished

    async def _release(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        try:
            await asyncio.to_thread(self.store.release_jobs, self.instance_id, job_ids)
        except ResultsDatabaseError as exc:  # their leases run out on their own
            logger.warning("job claims not released (%s)", type(exc).__name__)
        self._held.difference_update(job_ids)

    def close(self) -> None:
        """Release the database connections (after ``drain``, or for a service never started)."""
        retire_holder(self.instance_id)
        if self._leases is not None:
            self._leases.close()
        if self.outbox is not None:
            self.outbox.close()
        if self.orders is not None:
            self.orders.close()
        self.store.close()

    def dispatcher_failed(self) -> bool:
        """True when the dispatch loop ended other than by ``drain`` (health check fails)."""
        task = self._dispatcher
        return task is not None and task.done() and not self._draining

    async def readiness(self) -> dict[str, str]:
        """Readiness checks, each ``ok`` or why not: models self-tested, admitting, dispatching,
        the results database answering a cheap query and no write failing, the outbox
        answering and its delivery loop alive."""
        checks = {
            "models": "ok" if self._models_ready else "not loaded or self-test failed",
            "admission": "draining" if self._draining else "ok",
            "dispatcher": "stopped" if self.dispatcher_failed() or self._dispatcher is None else "ok",
        }
        try:
            await asyncio.to_thread(self.store.job, "readiness-probe")
            checks["database"] = "ok" if self._db_error is None else f"writes failing ({self._db_error})"
        except ResultsDatabaseError as exc:
            checks["database"] = f"unavailable ({type(exc).__name__})"
        if self.outbox is not None:
            try:
                await asyncio.to_thread(self.outbox.status)
                alive = self._delivery is not None and not self._delivery.done()
                checks["outbox"] = "ok" if alive or self._draining else "delivery loop stopped"
            except ResultsDatabaseError as exc:
                checks["outbox"] = f"unavailable ({type(exc).__name__})"
        pipeline_checks = getattr(self.pipeline, "readiness", None)
        if pipeline_checks is not None:  # Serve deployments behind the pipeline (serving.rayserve.app)
            checks.update(await pipeline_checks())
        return checks

    def set_max_inflight(self, limit: int) -> None:
        """Screen up to ``limit`` studies at once from now on (a Serve ingress follows the
        replicas of its downstream deployments: ``serving.rayserve.app``)."""
        limit = max(1, limit)
        if limit != self.settings.max_inflight:
            self.settings = self.settings.model_copy(update={"max_inflight": limit})
            self._wakeup.set()

    async def _persist(self, what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
        """Run a database write off the loop; while the database fails (full, locked, gone),
        retry with backoff (0.1 s doubling to 5 s) until it succeeds (True), or give up once the
        service drains (False) (the job then stays as last persisted and resumes at the next start).
        The job is never abandoned in a state the database does not know."""
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(fn, *args, **kwargs)
            except ResultsDatabaseError as exc:
                if self._db_error is None:
                    logger.error("results database write failed (%s: %s); retrying", what, type(exc).__name__)
                self._db_error = type(exc).__name__
                if self._draining:
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._db_error is not None:
                logger.info("results database writes succeed again")
            self._db_error = None
            return True

    # -- claims: several ingresses on one database ----------------------------------------

    async def _claim_more(self, *, look_for_dead: bool = False) -> int:
        """Claim unfinished jobs nobody holds, as many as this instance's window has room for
        (twice ``max_inflight``, less what it has queued and running); returns how many. With
        ``look_for_dead`` also those of holders known dead (a process of this host that is gone:
        a replica restarted after a crash resumes its predecessor's jobs without waiting for
        their leases)."""
        queued = sum(q.qsize() for q in self._queues.values())
        room = 2 * self.settings.max_inflight - queued - len(self._inflight)
        if room <= 0 or self._draining:
            return 0
        dead: list[str] = []
        if look_for_dead:
            holders = await asyncio.to_thread(self.store.job_holders)
            dead = sorted(h for h in holders if h != self.instance_id and holder_is_dead(h))
        records = await asyncio.to_thread(self.store.claim_jobs, self._claim, room, dead=dead)
        claimed = 0
        for record in records:
            if record.id in self._held:  # ours already (our lease had run out): queued here once
                continue
            self._held.add(record.id)
            self._lost.discard(record.id)
            self._enqueue(_job_of(record), persist=False)
            claimed += 1
        return claimed

    async def _renew(self) -> None:
        """Extend the lease of every job held here; a job another instance took over (this one
        stalled past its lease) is dropped here if it has not started."""
        mine = set(self._held)
        if not mine:
            return
        held = await asyncio.to_thread(self.store.renew_jobs, self._claim, mine)
        gone = mine - held
        for job_id in gone:  # finished meanwhile (already discarded), or taken over
            if job_id in self._held and job_id not in self._running:
                self._lost.add(job_id)
            self._held.discard(job_id)

    async def _claims_forever(self) -> None:
        renew_every = self.settings.job_lease_s / 3
        renewed = time.monotonic()
        failing = False
        while not self._draining:
            await asyncio.sleep(self.settings.claim_interval_s)
            try:
                tick = time.monotonic() - renewed >= renew_every
                if tick:
                    await self._renew()
                    renewed = time.monotonic()
                await self._claim_more(look_for_dead=tick)
            except ResultsDatabaseError as exc:  # leases run out while this lasts; work moves on elsewhere
                if not failing:
                    logger.warning("job claims failing (%s)", type(exc).__name__)
                failing = True
                continue
            failing = False

    # -- roles that run once per cluster ------------------------------------------------------

    def _roles(self) -> list[str]:
        roles = []
        if self.scp_settings is not None and self.scp_settings.enabled:
            roles.append(ROLE_SCP)
        if self.poller_settings is not None and self.poller_settings.enabled and self.poll_source is not None:
            roles.append(ROLE_POLLER)
        if self.orders is not None and self.orders_settings is not None and self.orders_settings.fhir.poll:
            roles.append(ROLE_FHIR_ORDERS)
        return roles

    def leads(self, role: str) -> bool:
        """Whether this instance runs ``role`` now (``scp``, ``poller``, ``fhir-orders``)."""
        return role in self._leading

    async def _lead_once(self, roles: list[str], *, at_start: bool = False) -> None:
        """Take or renew each role's lease; start what was won, stop what was lost. A role that
        fails to start gives its lease back (another instance tries); at start it raises."""
        assert self._leases is not None
        for role in roles:
            try:
                held = await asyncio.to_thread(
                    self._leases.acquire, role, self.instance_id, self.settings.leader_lease_s
                )
            except ResultsDatabaseError as exc:  # cannot renew: stop before the lease can run out
                logger.warning("role lease not renewed (%s)", type(exc).__name__)
                held = False
            if held and role not in self._leading:
                try:
                    await self._start_role(role)
                except Exception as exc:
                    await asyncio.to_thread(self._leases.release, role, self.instance_id)
                    if at_start:
                        raise
                    logger.error("role %s did not start (%s)", role, type(exc).__name__)
                    continue
                self._leading.add(role)
                logger.info("this instance now runs the %s", role)
            elif not held and role in self._leading:
                await self._stop_role(role)
                logger.info("this instance no longer runs the %s", role)

    async def _lead_forever(self, roles: list[str]) -> None:
        while not self._draining:
            await asyncio.sleep(self.settings.leader_lease_s / 3)
            if self._draining:
                return
            await self._lead_once(roles)

    async def _start_role(self, role: str) -> None:
        if role == ROLE_SCP:
            assert self.scp_settings is not None
            scp = StoreScp(
                self.scp_settings.ae_title,
                self.scp_settings.port,
                self.settings.spool_dir,
                self._on_scp_stable,
                stable_age_s=self.scp_settings.stable_age_s,
                host=self.scp_settings.host,
                allowed_ae_titles=self.scp_settings.allowed_ae_titles,
                move_ae_titles=self.scp_settings.move_ae_titles,
                ssl_context=scp_tls_context(self.scp_settings),
            )
            await asyncio.to_thread(scp.start)  # resumes the durable spool first
            self._scp = scp
        elif role == ROLE_POLLER:
            self._poller = asyncio.create_task(self._poll_forever())
        elif role == ROLE_FHIR_ORDERS:
            assert self.orders is not None and self.orders_settings is not None
            poller = FhirOrderPoller(self.orders, self.orders_settings, self.on_orders)
            self._order_poller = asyncio.create_task(self._poll_orders_forever(poller))

    async def _stop_role(self, role: str) -> None:
        self._leading.discard(role)
        if role == ROLE_SCP and self._scp is not None:
            scp, self._scp = self._scp, None
            await asyncio.to_thread(scp.stop)
        elif role == ROLE_POLLER and self._poller is not None:
            self._poller.cancel()
            self._poller = None
        elif role == ROLE_FHIR_ORDERS and self._order_poller is not None:
            self._order_poller.cancel()
            self._order_poller = None

    # -- admission -------------------------------------------------------------------------

    def check_admission(self, priority: PriorityValues) -> None:
        """Raise ``ServiceDraining`` or ``QueueFull`` now, before a caller reads an upload."""
        if self._draining:
            raise ServiceDraining()
        with self._slots:
            queued = self._queues[priority].qsize() + self._handing[priority] + len(self._slot_waiters[priority])
            full = queued >= self._capacity[priority]
        if full:
            self.metrics.rejected.labels(priority.value).inc()
            raise QueueFull(f"{priority.value} queue is full", retry_after_s=1)

    def _enqueue(self, job: _Job, *, persist: bool = True) -> str | None:
        """Persist and queue ``job``; returns the id of the job that answers (another one when
        the store found an equivalent: same Idempotency-Key or dedupe key), None when an
        automatic trigger's study was already screened from the store. Callable from the event
        loop or from a worker thread (the commit then stays off the loop); jobs resumed at
        start (``persist=False``) were accepted before and are not counted against capacity."""
        priority = job.priority
        queue = self._queues[priority]
        if persist and self._draining:  # built before the drain began: nothing reads the queue now
            raise ServiceDraining()
        with self._slots:
            if persist and queue.qsize() + self._handing[priority] >= self._capacity[priority]:
                self.metrics.rejected.labels(priority.value).inc()
                raise QueueFull(
                    f"{priority.value} queue is full",
                    retry_after_s=max(1, int(queue.qsize() * 0.5 / self.settings.max_inflight)),
                )
            self._handing[priority] += 1
        handed = False
        try:
            if persist:
                try:
                    admission = self.store.add_job(
                        job.id,
                        job.priority.value,
                        job.request.study_instance_uid,
                        job.request.spool_dir,
                        provenance=job.provenance,
                        dedupe_key=job.dedupe_key,
                        idempotency=job.idempotency,
                        unless_screened=job.unless_screened,
                        audit_action=job.audit_action,
                        claim=self._claim,
                        files=job.upload,
                    )
                except ResultsDatabaseError as exc:  # nothing accepted: the caller gets 503 + Retry-After
                    self._db_error = type(exc).__name__
                    raise
                if not admission.created:
                    return admission.job_id
                if job.upload:  # kept in the database now: read again when it runs, on any node
                    job.upload, job.kept = (), True
            self._held.add(job.id)
            if self._loop is not None and threading.get_ident() != self._loop_thread:
                self._loop.call_soon_threadsafe(self._put, job)
            else:
                self._put(job)
            handed = True
            return job.id
        finally:
            if not handed:
                with self._slots:
                    self._handing[priority] -= 1

    def _put(self, job: _Job) -> None:
        """In the event loop: the admitted job joins its queue and the dispatcher wakes."""
        with self._slots:
            self._handing[job.priority] -= 1
            self._queues[job.priority].put_nowait(job)
        self.metrics.queue_depth.labels(job.priority.value).set(self._queues[job.priority].qsize())
        self._wakeup.set()

    def submit(
        self,
        request: StudyRequest,
        priority: PriorityValues,
        *,
        provenance: Provenance | None = None,
        idempotency: Idempotency | None = None,
        audit_action: str | None = None,
    ) -> str:
        """Persist and enqueue; returns the job id: the existing job's for a retried
        Idempotency-Key, or for a study already queued from the store (one dedupe key for SCP,
        webhook, poller and API). Raises ``QueueFull``, ``ServiceDraining``,
        ``IdempotencyKeyReused``."""
        job_id, _created = self._submit(
            self._new_job(request, priority, provenance, idempotency, audit_action=audit_action)
        )
        assert job_id is not None  # only automatic submissions can find nothing to do
        return job_id

    def _submit(self, job: _Job) -> tuple[str | None, bool]:
        """Admit ``job`` (``_new_job``): (answering job id, whether it is a new job)."""
        job_id = self._enqueue(job)
        return job_id, job_id == job.id

    def _new_job(
        self,
        request: StudyRequest,
        priority: PriorityValues,
        provenance: Provenance | None,
        idempotency: Idempotency | None = None,
        *,
        unless_screened: bool = False,
        audit_action: str | None = None,
    ) -> _Job:
        if self._draining:
            raise ServiceDraining()
        provenance = provenance or default_provenance(request, SYSTEM_ACTOR)
        store_copy = provenance.source.value in STORE_SOURCES
        return _Job(
            new_screening_uuid(),
            priority,
            replace(request, files=()),  # the instances go to the database, not into the queue
            provenance=provenance,
            dedupe_key=request.study_instance_uid if store_copy else None,
            idempotency=idempotency,
            unless_screened=unless_screened,
            audit_action=audit_action,
            upload=request.files,
        )

    def submit_automatic(
        self,
        study_instance_uid: str,
        trigger: str,
        requested_by: str = SYSTEM_ACTOR,
        priority: PriorityValues | None = None,
        audit_action: str | None = None,
    ) -> str | None:
        """A trigger that fires on its own (webhook, poller): never screens a study twice.

        Returns the job id, or None when the study's store copy was already screened or is
        queued (checked with the new job's insert, in one transaction). An upload claiming the
        same Study UID does not count: it says nothing about the store's copy."""
        if not is_dicom_uid(study_instance_uid):
            self.metrics.triggers.labels(trigger, "refused").inc()
            return None
        provenance = Provenance(SourceValues.PACS_FETCH, TriggerValues(trigger), requested_by)
        job_id, created = self._submit(
            self._new_job(
                StudyRequest(study_instance_uid=study_instance_uid),
                priority or self.order_priority(study_instance_uid),
                provenance,
                unless_screened=True,
                audit_action=audit_action,
            )
        )
        self.metrics.triggers.labels(trigger, "submitted" if created else "duplicate").inc()
        return job_id if created else None

    def _on_scp_stable(self, study_instance_uid: str, folder: Path) -> bool:
        """From the SCP's watcher thread: hand the spooled study to the event loop and wait
        until its job is persisted (True: the job owns the folder), or until it is clear that it
        cannot be admitted now (False: the SCP offers it again after another stable period; the
        spool survives a restart meanwhile)."""
        loop = self._loop
        if loop is None:
            return False
        priority = self.order_priority(study_instance_uid, spooled_accession(folder))  # this thread: no loop stall
        files = read_spooled(folder)  # this thread too: the database keeps them for every node

        def submit() -> bool:
            if not is_dicom_uid(study_instance_uid):
                self.metrics.triggers.labels("c-store", "refused").inc()  # the spool stays for an operator
                return True
            try:  # saved WITH its Study UID: the poller and the webhook see it queued
                _job_id, created = self._submit(
                    self._new_job(
                        StudyRequest(study_instance_uid=study_instance_uid, files=files),
                        priority,
                        Provenance(SourceValues.SCP_PUSH, TriggerValues.SCP),
                        unless_screened=True,
                    )
                )
            except (QueueFull, ServiceDraining, ResultsDatabaseError):
                self.metrics.triggers.labels("c-store", "refused").inc()  # offered again later
                return False
            self.metrics.triggers.labels("c-store", "submitted" if created else "duplicate").inc()
            # the instances are in the results database with the job (or the study was known):
            # the node-local spool folder is not needed any more
            shutil.rmtree(folder, ignore_errors=True)
            return True

        async def on_loop() -> bool:
            return submit()

        try:
            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout=60)
        except (TimeoutError, RuntimeError):  # the loop is gone or stalled: keep the spool
            return False

    # -- orders ----------------------------------------------------------------------------

    def order_priority(self, study_instance_uid: str, accession_number: str = "") -> PriorityValues:
        """STAT when an order (not cancelled) for the study, by Study UID or accession number,
        asks for it; routine otherwise, also while the database does not answer."""
        if self.orders is None:
            return PriorityValues.ROUTINE
        try:
            record = self.orders.match(study_instance_uid, accession_number)
        except ResultsDatabaseError:
            return PriorityValues.ROUTINE
        if record is not None and record.order.priority == OrderPriorityValues.STAT:
            return PriorityValues.STAT
        return PriorityValues.ROUTINE

    def stat_orders(self) -> tuple[set[str], set[str]]:
        """Study UIDs and accession numbers of STAT orders: the worklist reads them first, also
        when the study was screened before its order came (no second screening)."""
        if self.orders is None:
            return set(), set()
        return self.orders.stat_keys()

    def on_orders(self, records: Sequence[OrderRecord]) -> None:
        """Orders just stored (HL7 listener and FHIR endpoint: in the event loop; FHIR poller: from
        its thread). An order known by accession only is looked up in the store (the study may
        be there already) and linked to its Study UID; an order that says its images are taken
        (ORC-5 CM, ImagingStudy available) has its study fetched now at its priority, never a
        second screening of a study already screened from the store. Others wait for the images
        to arrive by push, webhook or poller."""
        loop = self._loop
        if loop is None:
            return
        try:
            in_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            in_loop = False
        for record in records:
            order = record.order
            if order.status == OrderStatusValues.CANCELLED:
                continue
            if order.study_instance_uid and in_loop:
                self._submit_order(order, order.study_instance_uid)  # before the sender's ACK
                continue
            if not order.study_instance_uid and not (order.accession_number and self.poll_source is not None):
                continue
            if in_loop:
                task = loop.create_task(self._resolve_order(record))
                self._order_tasks.add(task)
                task.add_done_callback(self._order_tasks.discard)
            else:
                asyncio.run_coroutine_threadsafe(self._resolve_order(record), loop)

    async def _resolve_order(self, record: OrderRecord) -> None:
        order, uid = record.order, record.order.study_instance_uid
        if not uid and self.poll_source is not None and self.orders is not None:
            try:
                found = await asyncio.to_thread(
                    self.poll_source.search_studies, accession_number=order.accession_number
                )
            except SourceError as exc:  # the images may come later by push, webhook or poller
                logger.warning("order accession lookup failed (%s)", type(exc).__name__)
                return
            if len(set(found)) != 1 or not is_dicom_uid(found[0]):
                return  # not in the store yet, or the accession is ambiguous there
            uid = found[0]
            await asyncio.to_thread(self.orders.link_study, record.id, uid)
        if uid:
            self._submit_order(order, uid)

    def _submit_order(self, order: Order, study_instance_uid: str) -> None:
        """Fetch the study of an order whose images are taken (in the event loop)."""
        if order.status != OrderStatusValues.COMPLETED:
            return
        stat = order.priority == OrderPriorityValues.STAT
        try:
            self.submit_automatic(
                study_instance_uid, TriggerValues.ORDER.value, priority=PriorityValues.STAT if stat else None
            )
        except (QueueFull, ServiceDraining, ResultsDatabaseError) as exc:
            # the order is stored: the poller, a push or the webhook still bring the study
            logger.warning("order-triggered screening not queued (%s)", type(exc).__name__)

    async def _poll_orders_forever(self, poller: FhirOrderPoller) -> None:
        assert self.orders_settings is not None
        while True:
            try:
                await asyncio.to_thread(poller.poll_once)
            except (SourceError, ResultsDatabaseError) as exc:  # the next sweep starts where this one did
                logger.warning("FHIR order poll failed (%s)", type(exc).__name__)
            await asyncio.sleep(self.orders_settings.fhir.interval_s)

    def _with_order(self, result: ScreeningResult, priority: PriorityValues) -> ScreeningResult:
        """The result with its order's placer/filler numbers (the ORU^R01 carries them), the
        accession the order gave when the images had none, and STAT when the order asks for it;
        links the order to the Study UID its accession led to."""
        assert self.orders is not None
        try:
            record = self.orders.match(result.study_instance_uid, result.accession_number)
            if record is None:
                return result
            if not record.order.study_instance_uid and is_dicom_uid(result.study_instance_uid):
                self.orders.link_study(record.id, result.study_instance_uid)
        except ResultsDatabaseError as exc:
            logger.warning("order lookup failed (%s); result kept without its order", type(exc).__name__)
            return result
        order = record.order
        stat = order.priority == OrderPriorityValues.STAT or priority == PriorityValues.STAT
        return result.model_copy(
            update={
                "placer_order_number": order.placer_number or result.placer_order_number,
                "filler_order_number": order.filler_number,
                "accession_number": result.accession_number or order.accession_number,
                "requested_priority": PriorityValues.STAT.value if stat else result.requested_priority,
            }
        )

    async def _deliver_forever(self, interval_s: float = 0.2) -> None:
        assert self.outbox is not None
        worker = OutboxWorker(self.outbox, self.sinks, self.store.for_delivery)
        while not self._draining:
            try:
                await asyncio.to_thread(worker.run_once)
            except Exception as exc:  # keep delivering; the rows stay pending
                # type only: library messages can carry URLs with UIDs
                logger.error("outbox pass failed (%s)", type(exc).__name__)
            await asyncio.sleep(interval_s)

    async def _poll_forever(self) -> None:
        assert self.poller_settings is not None and self.poll_source is not None
        while True:
            try:
                await self.poll_once()
            except SourceError as exc:
                logger.warning("poller: store unavailable (%s)", type(exc).__name__)
            await asyncio.sleep(self.poller_settings.interval_s)

    async def poll_once(self) -> int:
        """One QIDO-RS sweep over the lookback window; returns how many studies were submitted."""
        assert self.poller_settings is not None and self.poll_source is not None
        today = datetime.now(UTC).date()
        window = f"{(today - timedelta(days=self.poller_settings.lookback_days)).strftime('%Y%m%d')}-{today.strftime('%Y%m%d')}"
        submitted = 0
        for modality in self.poller_settings.modalities:
            uids = await asyncio.to_thread(self.poll_source.search_studies, modality=modality, study_date=window)
            for uid in uids:
                # not "seen once": a study whose job failed (store down) is offered again next sweep
                if self.submit_automatic(uid, "poller"):
                    submitted += 1
        return submitted

    def submit_upload(
        self, files: Sequence[bytes], priority: PriorityValues, *, requested_by: str = SYSTEM_ACTOR
    ) -> str:
        """Submit uploaded instances as ``submit_spooled`` does (kept in the results database,
        recorded as an upload)."""
        self.check_admission(priority)
        return self.submit_spooled(SpooledUpload(parts=list(files)), priority, requested_by=requested_by)

    def submit_spooled(
        self,
        upload: SpooledUpload,
        priority: PriorityValues,
        *,
        requested_by: str = SYSTEM_ACTOR,
        idempotency_key: str | None = None,
        audit_action: str | None = None,
    ) -> str:
        """Submit the instances of an upload as received (the HTTP upload: in memory or in a
        private spool folder).

        The files' Study UID is checked (``InvalidIdentifier``) and recorded; the screening is an
        ``upload``: it never replaces or silences the result of the store's copy. The instances
        are kept in the results database with the job (one transaction), so that any ingress on
        any node can screen it; the upload is let go once they are read. With an
        ``idempotency_key`` a retried upload (same files, same priority) answers with the first
        job."""
        try:
            job = self._spooled_job(
                upload, priority, requested_by=requested_by, idempotency_key=idempotency_key, audit_action=audit_action
            )
        finally:
            upload.discard()
        job_id = self._enqueue(job)
        assert job_id is not None
        return job_id

    def _spooled_job(
        self,
        upload: SpooledUpload,
        priority: PriorityValues,
        *,
        requested_by: str,
        idempotency_key: str | None,
        audit_action: str | None,
    ) -> _Job:
        """The job for an upload, its instances read into memory (the caller lets the upload go)."""
        files = upload.files()
        uid = upload_study_uid(files)
        idempotency = (
            Idempotency(requested_by, idempotency_key, upload_hash(files, priority.value))
            if idempotency_key is not None
            else None
        )
        request = StudyRequest(study_instance_uid=uid, files=files)
        provenance = Provenance(SourceValues.UPLOAD, TriggerValues.API, requested_by)
        return self._new_job(request, priority, provenance, idempotency, audit_action=audit_action)

    async def admit_upload(
        self,
        upload: SpooledUpload,
        priority: PriorityValues,
        *,
        requested_by: str = SYSTEM_ACTOR,
        idempotency_key: str | None = None,
        audit_action: str | None = None,
        screen_within_s: float = 0.0,
    ) -> str:
        """Admit an upload (as ``submit_spooled``) and return its job id once the job is durable.

        With ``screen_within_s`` > 0 (a caller that waits for the result) the upload is screened
        first, from memory, in a screening slot: at once when one is free and nothing waits for
        one; else, when it was received in memory (``api.upload_memory_bytes``, still held),
        as soon as one frees up (admitted jobs first, stat before routine) within
        ``screen_within_s``. A screening that ends within ``screen_within_s`` of the upload is
        committed with its admission in one transaction (one durable commit, its instances never
        written to the database); a longer one is admitted then (claimed here, its instances
        kept) and goes on; an upload still without a slot then is admitted and queued as any.
        Either way the caller learns a job id only once the job is durable (ADR 0026)."""
        arrived = time.monotonic()
        try:
            job = await asyncio.to_thread(
                self._spooled_job,
                upload,
                priority,
                requested_by=requested_by,
                idempotency_key=idempotency_key,
                audit_action=audit_action,
            )
            if screen_within_s > 0 and not self._draining:
                if job.idempotency is not None:  # a retry of a finished upload is not screened again
                    seen = await asyncio.to_thread(self.store.idempotent_job, job.idempotency)
                    if seen is not None:
                        return seen
                if self._can_screen_now(priority):
                    return await self._screen_then_admit(job, screen_within_s)
                if upload.folder is None:  # held in memory within the budget: it may wait for a slot
                    taken = await self._wait_for_slot(job, arrived + screen_within_s)
                    if taken is not None:
                        return await taken
        finally:
            upload.discard()
        job_id = await asyncio.to_thread(self._enqueue, job)
        assert job_id is not None
        return job_id

    def _can_screen_now(self, priority: PriorityValues) -> bool:
        """A slot is free for ``priority`` and nothing that goes first waits for one: admitted
        jobs, and uploads waiting for a slot (stat ones, and for routine any)."""
        if self._draining:
            return False
        with self._slots:
            waiting = any(not q.empty() for q in self._queues.values()) or any(self._handing.values())
        waiting = waiting or bool(self._slot_waiters[PriorityValues.STAT])
        if priority == PriorityValues.ROUTINE:
            waiting = waiting or bool(self._slot_waiters[PriorityValues.ROUTINE])
        return not waiting and len(self._inflight) < self._room(priority)

    def _room(self, priority: PriorityValues) -> int:
        limit = self.settings.max_inflight
        return limit if priority == PriorityValues.STAT else max(1, limit - 1)  # as ``_next_job``

    async def _wait_for_slot(self, job: _Job, deadline: float) -> asyncio.Future[str] | None:
        """Wait (until ``deadline``) for the dispatcher to start ``job``'s screening in a slot;
        returns the future of its job id, or None when the deadline came first or the queue is
        full (the caller admits it then)."""
        if self._draining:  # the dispatcher is gone: nothing would start it
            raise ServiceDraining()
        waiters = self._slot_waiters[job.priority]
        with self._slots:
            queued = self._queues[job.priority].qsize() + self._handing[job.priority] + len(waiters)
        if queued >= self._capacity[job.priority]:
            return None  # no room to wait in memory: admitted (or refused as full) as any job
        waiter = _SlotWaiter(job, deadline, asyncio.get_running_loop().create_future())
        waiters.append(waiter)
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.started), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        finally:
            if waiter in waiters:  # not started: nothing of it ran
                waiters.remove(waiter)
        return waiter.answer if waiter.started.done() else None

    async def _screen_then_admit(self, job: _Job, within_s: float) -> str:
        # shielded: a client that goes away does not stop the screening or its commit
        return await asyncio.shield(self._start_screen_first(job, within_s))

    def _start_screen_first(self, job: _Job, within_s: float) -> asyncio.Future[str]:
        """Start ``_screen_first`` in a slot; returns the future of the job id it answers with."""
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._screen_first(job, within_s, answer))
        self._inflight.add(task)  # counted against ``max_inflight``; ``drain`` waits for it
        task.add_done_callback(self._finished)
        return answer

    async def _screen_first(self, job: _Job, within_s: float, answer: asyncio.Future[str]) -> None:
        screening = asyncio.ensure_future(self._screen_to_end(job))
        try:
            done, _pending = await asyncio.wait({screening}, timeout=within_s)
            ended = screening.result() if done else None
            finished = ended if isinstance(ended, tuple) else None
            try:
                admission = await asyncio.to_thread(self._admit, job, finished[0] if finished else None)
            except BaseException as exc:  # nothing accepted: the caller gets the error (503, 409...)
                screening.cancel()
                if not answer.done():
                    answer.set_exception(exc)
                return
            if not answer.done():
                answer.set_result(str(admission.job_id))
            if not admission.created:  # a retried Idempotency-Key: the first job answers
                screening.cancel()
                return
            if finished is not None:
                self._ended_here(job.id)
                self._screened(job, finished[0].result, finished[1])
                return
            await self._record(job, await screening)  # admitted before it ended: as any job
        except BaseException as exc:  # never leave the caller waiting without an answer
            if not screening.done():
                screening.cancel()
            if not answer.done():
                answer.set_exception(exc if isinstance(exc, Exception) else ServiceDraining())
            raise
        finally:
            self._running.discard(job.id)
            self._held.discard(job.id)
            self._signal_done(job.id)

    def _admit(self, job: _Job, finished: Finished | None) -> Admission:
        """Commit the admission of a job screened before it was admitted: with its result
        (``finished``), or claimed here with its instances kept (still screening)."""
        try:
            admission = self.store.add_job(
                job.id,
                job.priority.value,
                job.request.study_instance_uid,
                None,
                provenance=job.provenance,
                dedupe_key=job.dedupe_key,
                idempotency=job.idempotency,
                audit_action=job.audit_action,
                claim=self._claim,
                files=() if finished is not None else job.upload,
                finished=finished,
            )
        except ResultsDatabaseError as exc:
            self._db_error = type(exc).__name__
            raise
        if admission.created and finished is None:
            job.upload, job.kept = (), True
            self._held.add(job.id)
        return admission

    # -- dispatch --------------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        limit = self.settings.max_inflight
        stat, routine = self._queues[PriorityValues.STAT], self._queues[PriorityValues.ROUTINE]
        if len(self._inflight) < limit and not stat.empty():
            return stat.get_nowait()
        routine_limit = limit - 1 if limit > 1 else 1  # keep a slot for stat
        if len(self._inflight) < routine_limit and not routine.empty():
            return routine.get_nowait()
        return None

    def _next_waiter(self) -> _SlotWaiter | None:
        """An upload waiting for a slot (stat first), when no admitted job needs the free slot."""
        for priority in (PriorityValues.STAT, PriorityValues.ROUTINE):
            waiters = self._slot_waiters[priority]
            if waiters and len(self._inflight) < self._room(priority):
                return waiters.popleft()
        return None

    async def _dispatch(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                waiter = self._next_waiter()
                if waiter is not None:  # its screening starts in the slot, its caller learns the id
                    left = waiter.deadline - time.monotonic()
                    waiter.answer = self._start_screen_first(waiter.job, max(left, 0.001))
                    waiter.started.set_result(None)
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            for p, q in self._queues.items():
                self.metrics.queue_depth.labels(p.value).set(q.qsize())
            task = asyncio.create_task(self._run(job))
            self._inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wakeup.set()
        if self._idle():  # the heap kept for the next study goes back once nothing comes for a while
            if self._trim_timer is not None:
                self._trim_timer.cancel()
            self._trim_timer = asyncio.get_running_loop().call_later(_IDLE_TRIM_S, self._trim_if_idle)

    def _idle(self) -> bool:
        return not self._inflight and all(q.empty() for q in self._queues.values())

    def _alone(self) -> bool:
        """One screening under way (the caller's) and nothing queued or waiting for a slot."""
        return (
            len(self._inflight) <= 1
            and all(q.empty() for q in self._queues.values())
            and not any(self._slot_waiters.values())
        )

    def _trim_if_idle(self) -> None:
        self._trim_timer = None
        if self._idle():  # the burst is over: give the freed upload and decode buffers back (models.heap)
            trim = asyncio.get_running_loop().create_task(asyncio.to_thread(trim_heap))
            self._trims.add(trim)
            trim.add_done_callback(self._trims.discard)

    async def wait_for(self, job_id: str, timeout_s: float) -> None:
        """Return when the job is DONE/FAILED or after ``timeout_s``: signalled when this instance
        runs it, else read from the database every 0.2 s (another ingress screens it)."""
        if job_id in self._ended:  # ended here a moment ago: nothing to read
            return
        deadline = time.monotonic() + timeout_s
        while True:
            record = await asyncio.to_thread(self.store.job, job_id)
            if record is None or record.status in (JobStatusValues.DONE, JobStatusValues.FAILED):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            event = self._done_events.setdefault(job_id, asyncio.Event())
            local = job_id in self._held
            try:
                await asyncio.wait_for(event.wait(), timeout=left if local else min(left, 0.2))
            except TimeoutError:
                if local:
                    return
                continue
            return

    def ended_here(self, job_id: str) -> bool:
        """This instance committed the job's end (DONE or FAILED) a moment ago."""
        return job_id in self._ended

    def _ended_here(self, job_id: str) -> None:
        """The job's end (DONE or FAILED) is committed: its waiters need not read it back."""
        self._ended[job_id] = None
        if len(self._ended) > _ENDED_REMEMBERED:
            del self._ended[next(iter(self._ended))]

    def _signal_done(self, job_id: str) -> None:
        event = self._done_events.pop(job_id, None)
        if event is not None:
            event.set()

    async def _run(self, job: _Job) -> None:
        try:
            if job.id in self._lost:  # another instance took it over while it waited here
                self._lost.discard(job.id)
                return
            await self._run_job(job)
        finally:
            self._running.discard(job.id)
            self._held.discard(job.id)
            self._signal_done(job.id)

    async def _run_job(self, job: _Job) -> None:
        await self._record(job, await self._screen_to_end(job))

    async def _screen_to_end(self, job: _Job) -> _Ended:
        """Screen ``job`` and say how it ended (nothing persisted here): its result, evidence and
        the sinks to deliver to, or why it failed, or that its upload cannot be read here."""
        queued_s = time.monotonic() - job.enqueued
        self.metrics.stage_seconds.labels("queue").observe(queued_s)
        # RUNNING is this process's knowledge, not a durable state: the database keeps the job
        # QUEUED until its result (or failure) commits, so a crash resumes it either way and a
        # screening costs two durable commits (admission, result) rather than three
        self._running.add(job.id)
        start = time.monotonic()
        try:
            result, evidence = await asyncio.wait_for(self._screen(job), timeout=self.settings.request_timeout_s)
        except UploadUnavailable:
            return _Unreadable()
        except TimeoutError:
            return _Failed(JobFailureValues.TIMEOUT, f"not finished within {self.settings.request_timeout_s:.0f} s")
        except StudyNotFound:
            return _Failed(JobFailureValues.STUDY_NOT_FOUND, "study not found in the configured store")
        except SourceError as exc:
            return _Failed(JobFailureValues.SOURCE_UNAVAILABLE, type(exc).__name__)
        except Exception as exc:  # the service stays up; the job records why
            # type only, no traceback: library messages can quote URLs/UIDs (patient data)
            logger.error(
                "screening job failed (%s)", type(exc).__name__, extra={"request_id": job.id, "stage": "screen"}
            )
            return _Failed(JobFailureValues.INTERNAL_ERROR, type(exc).__name__)
        elapsed = time.monotonic() - start
        result = result.model_copy(
            update={
                "duration_ms": round(elapsed * 1000.0, 1),
                "requested_priority": job.priority.value,
                "result_id": job_result_id(job.id),  # a re-screening of this job: the same delivery ids
            }
        )
        if self.orders is not None:
            result = await asyncio.to_thread(self._with_order, result, job.priority)
        # SCREENED: a row for every sink; NOT_SCREENED: for the sinks that report it (the EMR
        # is told that the AI looked and declined, and why)
        sinks = [
            name
            for name, sink in self.sinks.items()
            if result.outcome == OutcomeValues.SCREENED or getattr(sink, "reports_not_screened", False)
        ]
        return Finished(result, evidence, sinks), elapsed + queued_s

    async def _record(self, job: _Job, ended: _Ended) -> None:
        """Persist how an admitted job ended (the result with its evidence and outbox rows in one
        commit, before any delivery), or give it back when its upload cannot be read here."""
        if isinstance(ended, _Unreadable):
            await self._upload_unavailable(job)
            return
        if isinstance(ended, _Failed):
            await self._fail(job, ended.reason, ended.detail)
            return
        done, total_s = ended
        saved = await self._persist(
            "finish", self.store.finish_job, job.id, done.result, evidence=done.evidence, sinks=done.sinks
        )
        if not saved:
            return  # draining with the database down: the job resumes (and is screened again) at the next start
        self._ended_here(job.id)
        if job.request.spool_dir:
            shutil.rmtree(job.request.spool_dir, ignore_errors=True)
        self._screened(job, done.result, total_s)

    def _screened(self, job: _Job, result: ScreeningResult, total_s: float) -> None:
        self.metrics.stage_seconds.labels("total").observe(total_s)
        self.metrics.screenings.labels(result.outcome.value, job.priority.value).inc()
        logger.info(
            "screening done",
            extra={
                "request_id": job.id,
                "study_ref": result.study_ref,
                "outcome": result.outcome.value,
                "duration_ms": result.duration_ms,
            },
        )

    async def _upload_unavailable(self, job: _Job) -> None:
        """The job's instances cannot be read here now: give the job back for a later attempt
        (here or on another node), or end it FAILED after ``max_job_claims`` attempts; never a
        NOT_SCREENED result for a study nobody could read."""
        if job.attempts >= self.settings.max_job_claims:
            await self._fail(job, JobFailureValues.UPLOAD_UNAVAILABLE, "the uploaded instances could not be read")
            return
        logger.warning("upload not readable here; job given back for a retry", extra={"request_id": job.id})
        retry = Claim(self.instance_id, min(self.settings.job_lease_s, 5.0 * job.attempts))
        try:  # held a little longer by nobody in particular: any instance claims it once that passes
            await asyncio.to_thread(self.store.renew_jobs, retry, [job.id])
        except ResultsDatabaseError as exc:  # its lease runs out on its own
            logger.warning("job not given back (%s)", type(exc).__name__)

    async def _fail(self, job: _Job, reason: JobFailureValues, detail: str) -> None:
        saved = await self._persist(
            "failed",
            self.store.update_job,
            job.id,
            JobStatusValues.FAILED,
            error_reason=reason.value,
            error_detail=detail,
        )
        if saved:
            self._ended_here(job.id)
        self.metrics.screenings.labels("FAILED", job.priority.value).inc()
        logger.warning("screening failed", extra={"request_id": job.id, "reason": reason.value})

    async def _screen(self, job: _Job) -> tuple[ScreeningResult, list[Dataset]]:
        if job.kept:  # read now (not held in the queue): they travel to the preparing node as bytes
            files = await asyncio.to_thread(self.store.upload_files, job.id)
            if not files:
                raise UploadUnavailable("the upload's instances are not in the results database")
            job = replace(job, request=replace(job.request, files=tuple(files)))
        elif job.upload:  # screened before its admission (``admit_upload``): from memory
            job = replace(job, request=replace(job.request, files=job.upload))
        prepared, pairs = await self._screen_in_stages(self.pipeline, job)
        for image, out in pairs:
            if isinstance(out, ModelOutputs) and out.batch_size:
                # labelled by model id: a versioned pipeline names images id@version (serving.online.versions)
                self.metrics.batch_size.labels(image.model_id.partition("@")[0]).observe(out.batch_size)
        return self._assemble(job, prepared, pairs)

    async def _screen_in_stages(
        self, pipeline: Pipeline, job: _Job
    ) -> tuple[PreparedStudy, list[tuple[PreparedImage, ModelOutputs | InferenceFailed]]]:
        t0 = time.monotonic()
        prepared = await pipeline.prepare_study(job.request)
        self.metrics.stage_seconds.labels("prepare").observe(time.monotonic() - t0)
        t1 = time.monotonic()

        async def infer(image: PreparedImage) -> tuple[PreparedImage, ModelOutputs | InferenceFailed]:
            # this task's context only: a run that has the cores to itself may take the lone-run
            # session (``OnnxPredictor``); asyncio.to_thread carries the flag to the thread
            RUN_ALONE.set(len(prepared.prepared) == 1 and self._alone())
            try:
                return image, await pipeline.infer(image.model_id, image.tensors)
            except InferenceFailed as exc:
                return image, exc

        paired = await asyncio.gather(*(infer(i) for i in prepared.prepared))
        self.metrics.stage_seconds.labels("infer").observe(time.monotonic() - t1)
        return prepared, list(paired)

    def _assemble(
        self,
        job: _Job,
        prepared: PreparedStudy,
        paired: list[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
    ) -> tuple[ScreeningResult, list[Dataset]]:
        uids = [i.study_instance_uid for i in prepared.prepared] + [r.study_instance_uid for r in prepared.rejected]
        uid = next((u for u in uids if is_dicom_uid(u)), "")
        if not uid and job.request.study_instance_uid:
            uid = job.request.study_instance_uid
        evidence = [i.header for i in prepared.prepared if i.header is not None]
        result = self.screener.assemble(uid, paired, prepared.rejected)
        if "dicom-sr" in self.sinks:  # masks exist only now: their SEG travels with the evidence
            evidence += build_seg(result, paired, self.screener.loaded)
        return result, evidence

    # -- queries ---------------------------------------------------------------------------

    def job(self, job_id: str) -> tuple[JobRecord, ScreeningResult | None] | None:
        found = self.store.job_and_result(job_id)
        if found is None:
            return None
        record, result = found
        if record.status == JobStatusValues.QUEUED and job_id in self._running:
            record = replace(record, status=JobStatusValues.RUNNING.value)
        return record, result

    def queue_depth(self) -> dict[str, int]:
        return {p.value: q.qsize() for p, q in self._queues.items()} | {"inflight": len(self._inflight)}


def spooled_accession(folder: Path) -> str:
    """The Accession Number of a spooled study (its first readable instance header; empty
    when none is readable): how an order known only by accession finds its pushed study."""
    for path in sorted(folder.glob("*.dcm"))[:3]:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
        except Exception as exc:  # a hostile or partial file: the screening reports it, not this lookup
            logger.debug("spooled header unreadable for the order lookup (%s)", type(exc).__name__)
            continue
        return str(ds.get("AccessionNumber", "") or "")[:64]
    return ""


def read_spooled(folder: Path) -> tuple[bytes, ...]:
    """The instances of a spool folder, in order (an upload streamed in, a pushed study)."""
    return tuple(path.read_bytes() for path in sorted(folder.glob("*.dcm")))


def _job_of(record: JobRecord) -> _Job:
    """A job claimed from the database: its instances are in ``uploads`` unless it names a local
    spool folder (admitted before they moved into the database) or the store (a PACS fetch)."""
    kept = record.source in (SourceValues.UPLOAD.value, SourceValues.SCP_PUSH.value) and not record.spool_dir
    return _Job(
        record.id,
        PriorityValues(record.priority),
        StudyRequest(study_instance_uid=record.study_instance_uid, spool_dir=record.spool_dir),
        kept=kept,
        attempts=record.attempts,
    )
