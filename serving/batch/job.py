"""Batch screening jobs: thousands of archived studies at full machine speed: on one CPU-only
machine in a process pool (``batch.runtime: auto``/``local``, ADR 0027), on a cluster or a GPU
node on Ray Data (what follows; ``ray``). Both run the same stages on the same rows.

    plan (headers only, grouped by study) -> skip what the ledger says is done
    -> read: the driver's node reads the files; their bytes travel in Ray's object store (ADR 0020)
    -> Ray Data, one of two topologies over the same two stages:
         staged: Prepare actors (read, QA/route, decode incl. reduced J2K, preprocess)
                 -> Infer actor(s) (the same OnnxPredictor + run_model as the online path)
         fused:  one actor per core running Prepare then Infer on its own batches
    -> driver: assemble per study (StudyScreener.assemble), ledger, results store, progress

``staged`` is for an accelerator: CPU actors decode while the GPU actor infers, so the model
never waits for decode. On a CPU-only node decode and inference compete for the same cores:
there ``fused`` wins (measured in ADR 0009), because each actor keeps one core busy with no cross-process hand-off, and while one actor decodes the
others infer. ``auto`` picks
``staged`` when a CUDA device is present, else ``fused``. The same code runs on a laptop or on
a cluster (``address``). The ledger (``serving.persistence.ledger``: SQLite in the job folder)
makes a job resumable: an interrupted job restarted with the same output folder skips finished
studies. Nothing is assumed shared between nodes: the actors get the settings object, the input
bytes and the model versions the driver resolved (``shipping``), and a study whose files cannot
be read is an error to retry (``InputUnreadable``), never a finished result.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle  # nosec: rows are this job's own objects passed between its own actors
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.decode import study_uid_of
from models.errors import InferenceFailed, InputUnreadable, ModelIntegrityError, ReasonCode, SourceError
from models.predictor import OnnxPredictor, cuda_device_count
from models.registry import resolve
from models.results import ScreeningResult
from serving.batch.shipping import ShippedModel, identity_of, pack, unpacked
from serving.core.screening import InstanceInput, PreparedImage, RejectedImage, StudyScreener, run_model
from serving.dicom.sources.local import candidate_files
from serving.online.pipeline import screener_options
from serving.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class PlannedStudy:
    key: str  # Study Instance UID, or "file:<n>" for an unreadable file
    files: list[Path]  # empty: fetch the study from the configured store


def plan_from_store(uids: list[str]) -> list[PlannedStudy]:
    """Studies named by UID, fetched from the configured store (DICOMweb) by the job."""
    return [PlannedStudy(uid, []) for uid in dict.fromkeys(u.strip() for u in uids if u.strip())]


def plan_studies(inputs: list[Path]) -> list[PlannedStudy]:
    """Group input files by Study Instance UID (headers only). Unreadable files stand alone."""
    studies: dict[str, PlannedStudy] = {}
    n = 0
    for root in inputs:
        for path in candidate_files(root):
            uid = study_uid_of(path)  # never raises: a hostile header stands alone
            key = uid or f"file:{n}"
            n += 1
            studies.setdefault(key, PlannedStudy(key, [])).files.append(path)
    return list(studies.values())


def _read_file(name: str, max_bytes: int) -> bytes | int:
    """A file's bytes, or its size when it is over ``max_bytes`` (then not read).

    Raises:
        InputUnreadable: the file is gone or cannot be read here.
    """
    try:
        with open(name, "rb") as fh:
            data = fh.read(max_bytes + 1)
            if len(data) > max_bytes:
                fh.seek(0, os.SEEK_END)
                return fh.tell()
            return data
    except OSError as exc:
        raise InputUnreadable(
            f"a file of the study could not be read on the driver's node ({type(exc).__name__})"
        ) from exc


def read_inputs(batch: dict[str, np.ndarray], *, max_file_bytes: int) -> dict[str, np.ndarray]:
    """Ray Data function, scheduled on the driver's node only: each study's files as bytes
    (pickled ``[(label, bytes | size)]``), which then travel through Ray's object store to the
    actor that decodes them on any node (ADR 0020). A file that cannot be read makes the row's
    ``error`` (``InputUnreadable``): the study is retried by the next run, not marked done."""
    inputs, errors = [], []
    for files in batch["files"]:
        read: list[tuple[str, bytes | int]] = []
        error = ""
        try:
            read = [(name, _read_file(name, max_file_bytes)) for name in json.loads(str(files))]
        except SourceError as exc:
            read, error = [], f"{type(exc).__name__}: {exc}"
        inputs.append(pickle.dumps(read))
        errors.append(error)
    return {
        "study": batch["study"],
        "inputs": np.array(inputs, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray: never imports it)."""
    ray = sys.modules.get("ray")
    return str(ray.get_runtime_context().get_node_id()) if ray is not None and ray.is_initialized() else ""


def _receive(models: Sequence[Any]) -> list[ShippedModel]:
    """The shipped versions, from object references (actors) or as they are (in-process)."""
    if all(isinstance(m, ShippedModel) for m in models):
        return list(models)
    import ray

    return [m if isinstance(m, ShippedModel) else ray.get(m) for m in models]


class PrepareStage:
    """Ray Data callable class: one row per study -> its prepared images (pickled list).

    A row carries its files' bytes (``read_inputs``), or (no files) names a study to fetch from
    the configured store. A read or store error becomes the row's ``error`` (the study is retried
    by the next run, not marked done). The models are the driver's (``shipping``): this node's
    registry is never read."""

    def __init__(self, settings: Settings, models: Sequence[Any]) -> None:
        from serving.online.factory import build_source

        with unpacked(_receive(models)) as loaded:
            self.screener = StudyScreener([], manifests=loaded, **screener_options(settings))
        self.source = build_source(settings) if settings.store.kind != "local" else None
        self.max_file_bytes = settings.batch.max_file_bytes

    def _prepare(self, study: str, read: list[tuple[str, bytes | int]]) -> list[PreparedImage | RejectedImage]:
        if not read:
            if self.source is None:
                raise SourceError("no study store configured for UID inputs")
            return [self.screener.prepare(i) for i in self.source.instances(study)]
        out: list[PreparedImage | RejectedImage] = []
        for label, data in read:
            if isinstance(data, int):
                uid = "" if study.startswith("file:") else study
                detail = f"the file is {data / 2**20:.0f} MiB, over batch.max_file_bytes"
                out.append(RejectedImage(label, uid, "", ReasonCode.IMAGE_TOO_LARGE, detail))
            else:
                out.append(self.screener.prepare(InstanceInput(data, label)))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "inputs" not in batch:  # a single-node job: the actor reads its rows' files itself
            batch = read_inputs(batch, max_file_bytes=self.max_file_bytes)
        prepared, errors = [], []
        for study, blob, error in zip(batch["study"], batch["inputs"], batch["error"], strict=True):
            if error:
                prepared.append(pickle.dumps([]))
                errors.append(str(error))
                continue
            try:
                read = pickle.loads(blob)  # noqa: S301 - our own rows
                prepared.append(pickle.dumps(self._prepare(str(study), read)))
                errors.append("")
            except SourceError as exc:
                prepared.append(pickle.dumps([]))
                errors.append(f"{type(exc).__name__}: {exc}")
        return {
            "study": batch["study"],
            "prepared": np.array(prepared, dtype=object),
            "error": np.array(errors, dtype=object),
        }


class InferStage:
    """Ray Data callable class: one ORT call per model for all images of the batch's studies.

    Its sessions are opened from the driver's shipped bytes (``shipping``); every row says which
    versions ran it (``models``: id@version and artifact sha256), and the driver records a
    result only when that is the version it resolved."""

    def __init__(self, settings: Settings, models: Sequence[Any], threads: int | None = None) -> None:
        with unpacked(_receive(models)) as loaded:
            predictors = [
                OnnxPredictor(one, **m.session_options(intra_op_threads=threads, lone_runs=False))
                for one, m in zip(loaded, settings.models, strict=True)
            ]
        self.screener = StudyScreener(predictors, **screener_options(settings))
        self.identities = json.dumps(sorted(identity_of(p.loaded) for p in predictors))
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        studies = [pickle.loads(p) for p in batch["prepared"]]  # noqa: S301 - our own rows
        flat = [
            (si, ii)
            for si, items in enumerate(studies)
            for ii, item in enumerate(items)
            if isinstance(item, PreparedImage)
        ]
        outputs: dict[tuple[int, int], Any] = {}
        by_model: dict[str, list[tuple[int, int]]] = {}
        for key in flat:
            by_model.setdefault(studies[key[0]][key[1]].model_id, []).append(key)
        for model_id, keys in by_model.items():
            tensors = [studies[s][i].tensors for s, i in keys]
            sizes = [len(t) for t in tensors]
            try:
                out = run_model(self.screener.predictors[model_id], np.concatenate(tensors), max(sum(sizes), 1))
            except InferenceFailed as exc:
                outputs.update(dict.fromkeys(keys, exc))
                continue
            start = 0
            for key, n in zip(keys, sizes, strict=True):
                outputs[key] = out.rows(start, n, batch_size=len(keys))
                start += n
        paired = []
        for si, items in enumerate(studies):
            pairs = []
            for ii, item in enumerate(items):
                if isinstance(item, PreparedImage):
                    item.tensors = item.tensors[:0]  # the driver needs no pixels; the header (a few
                    # kB, no pixel data) gives the result its patient id and accession number
                pairs.append((item, outputs.get((si, ii))))
            paired.append(pickle.dumps(pairs))
        return {
            "study": batch["study"],
            "paired": np.array(paired, dtype=object),
            "error": batch["error"],
            "models": np.array([self.identities] * len(paired), dtype=object),
            "node": np.array([self.node] * len(paired), dtype=object),
        }


class PrepareAndInferStage:
    """Ray Data callable class for the ``fused`` topology: both stages in one actor."""

    def __init__(self, settings: Settings, models: Sequence[Any], threads: int | None = 1) -> None:
        shipped = _receive(models)
        self.prepare = PrepareStage(settings, shipped)
        self.infer = InferStage(settings, shipped, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer(self.prepare(batch))


Topology = Literal["auto", "staged", "fused"]


def choose_topology(topology: Topology) -> Literal["staged", "fused"]:
    if topology != "auto":
        return topology
    return "staged" if cuda_device_count() > 0 else "fused"


@dataclass
class JobSummary:
    planned: int
    skipped: int
    screened_now: int
    seconds: float
    studies_per_s: float
    out_dir: Path
    results: list[ScreeningResult] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # study key -> why it could not be read or fetched
    #: Ray node id -> studies this run's inference ran there
    nodes: dict[str, int] = field(default_factory=dict)


def run_batch_job(
    inputs: list[Path],
    out_dir: Path,
    *,
    study_uids: list[str] | None = None,
    settings_path: str | None = None,
    address: str | None = None,
    prepare_actors: int = 1,
    infer_actors: int = 1,
    infer_threads: int | None = None,
    stop_after: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    save_to_results_store: bool = True,
    deliver: bool = False,
    deliver_timeout_s: float = 120.0,
) -> JobSummary:
    """Screen every study under ``inputs``; resumable via ``out_dir/ledger.sqlite3``.

    The topology, fused worker count and batch size come from the settings (``batch.topology``,
    ``batch.workers``, ``screening.batch_size``).

    Args:
        infer_threads: ORT threads per inference actor (fused: one unless said otherwise).
        prepare_actors, infer_actors: actor counts of the staged topology.
        stop_after: stop (as if interrupted) after this many newly finished studies.
        on_progress: called with (finished, total) after each study.
        deliver: send each newly screened study's result through the outbox to the configured
            sinks (FHIR, HL7, DICOM store-back), as the online service does
            (``serving.batch.deliver``); then deliver for up to ``deliver_timeout_s``.
    """
    # the driver's own: the workers, which import this module for its stages, need none of them
    from serving.batch.deliver import deliver_pending, record_for_delivery
    from serving.online.factory import build_sinks
    from serving.persistence.ledger import Ledger
    from serving.persistence.results import Provenance
    from serving.persistence.schema import SourceValues, TriggerValues

    settings = Settings.load(settings_path)
    # one exact version per model, resolved once here: the actors load these bytes (ADR 0020)
    resolved = [resolve(m.id, m.version) for m in settings.models]
    shipped = [pack(one) for one in resolved]
    expected_models = json.dumps(sorted(identity_of(one) for one in resolved))
    ledger = Ledger(out_dir / "ledger.sqlite3")
    planned = plan_studies(inputs) + plan_from_store(study_uids or [])
    done = ledger.done()
    fetched = {s.key for s in planned if not s.files}  # studies the job fetches from the store
    todo = [s for s in planned if s.key not in done]
    screener = StudyScreener([], manifests=resolved, **screener_options(settings))
    store = None
    if save_to_results_store:
        from serving.persistence.results import ResultsStore

        store = ResultsStore(settings.results.target)
    sinks = build_sinks(settings) if deliver and store is not None else {}
    runtime = choose_runtime(settings.batch.runtime, address)
    batches: Iterator[dict[str, np.ndarray]] = iter(())
    start = time.perf_counter()
    finished = 0
    nodes: dict[str, int] = {}
    try:
        if todo:
            rows = [{"study": s.key, "files": json.dumps([str(p) for p in s.files])} for s in todo]
            if runtime == "local":
                batches = _local_batches(rows, settings, shipped)
            else:
                batches = _ray_batches(
                    rows,
                    settings,
                    shipped,
                    address=address,
                    prepare_actors=prepare_actors,
                    infer_actors=infer_actors,
                    infer_threads=infer_threads,
                )
            del shipped
            for batch in batches:
                rows_out = zip(
                    batch["study"], batch["paired"], batch["error"], batch["models"], batch["node"], strict=True
                )
                for study, paired_blob, error, ran, node in rows_out:
                    study = str(study)
                    nodes[str(node)] = nodes.get(str(node), 0) + 1
                    if not error and str(ran) != expected_models:  # cannot happen with shipped bytes; checked
                        error = (
                            f"{ModelIntegrityError.__name__}: screened by other model versions than the job resolved"
                        )
                    if error:
                        ledger.record_error(study, str(error))
                        continue
                    pairs = pickle.loads(paired_blob)  # noqa: S301 - our own rows
                    prepared = [(i, o) for i, o in pairs if isinstance(i, PreparedImage)]
                    rejected = [i for i, _ in pairs if isinstance(i, RejectedImage)]
                    uid = study if not study.startswith("file:") else ""
                    result = screener.assemble(uid, prepared, rejected)
                    if store is not None:
                        # the results database first, then the ledger: a crash between them makes the
                        # rerun screen the study again, and its job id (the ledger's, stable) finds the
                        # record already DONE; the other order would skip a study never recorded.
                        # A study named by UID was fetched from the store: its result is the study's record
                        source = SourceValues.PACS_FETCH if study in fetched else SourceValues.FILES
                        record_for_delivery(  # with its outbox rows, in one transaction, once per job id
                            store,
                            result,
                            Provenance(source, TriggerValues.BATCH),
                            prepared,
                            sinks,
                            screener,
                            job_id=ledger.job_id(study),
                        )
                    ledger.record(study, result)
                    finished += 1
                    if on_progress:
                        on_progress(finished, len(todo))
                    if stop_after is not None and finished >= stop_after:
                        raise _Stop
    except _Stop:
        logger.info("batch job stopped after %d studies (resumable)", finished)
    finally:
        elapsed = time.perf_counter() - start
        try:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # first: an interrupted job's workers stop (and a Ray it started)
            if sinks and store is not None:
                pending, dead = deliver_pending(store, sinks, deliver_timeout_s, settings.results.delivery_lease_s)
                if pending or dead:
                    logger.warning("%d deliveries still pending, %d dead (dxassist outbox status)", pending, dead)
        finally:
            if store is not None:
                store.close()
    results = [r for _, r in ledger.results()]
    errors = ledger.errors()
    ledger.close()
    return JobSummary(
        planned=len(planned),
        skipped=len(planned) - len(todo),
        screened_now=finished,
        seconds=elapsed,
        studies_per_s=finished / elapsed if elapsed > 0 else 0.0,
        out_dir=out_dir,
        results=results,
        errors=errors,
        nodes=nodes,
    )


class _Stop(Exception):
    pass


Runtime = Literal["auto", "ray", "local"]


def choose_runtime(runtime: Runtime, address: str | None) -> Literal["ray", "local"]:
    """``auto``: a process pool on this machine when the job would start its own one-node Ray
    on a CPU-only node (no ``address``, no Ray running here, no CUDA device), else Ray Data
    (ADR 0027)."""
    if runtime != "auto":
        return runtime
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return "local" if address is None and not ray_running and cuda_device_count() == 0 else "ray"


_LOCAL_STAGE: PrepareAndInferStage | None = None


def _local_worker_init(settings: Settings, models_file: str) -> None:
    global _LOCAL_STAGE
    with open(models_file, "rb") as fh:
        models = pickle.load(fh)  # noqa: S301 - written by this job's driver, in its private folder
    _LOCAL_STAGE = PrepareAndInferStage(settings, models, 1)
    gc.freeze()  # start-up's objects live as long as the worker: out of every collection (and the one at exit)


def _local_worker_run(rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    assert _LOCAL_STAGE is not None
    return _LOCAL_STAGE(
        {
            "study": np.array([r["study"] for r in rows], dtype=object),
            "files": np.array([r["files"] for r in rows], dtype=object),
        }
    )


def _local_batches(
    rows: list[dict[str, str]], settings: Settings, models: list[ShippedModel]
) -> Iterator[dict[str, np.ndarray]]:
    """The fused stage (``PrepareAndInferStage``) in a pool of worker processes on this machine,
    one per core (``batch.workers``), each with one ORT thread and the driver's model bytes;
    ``screening.batch_size`` studies per task, at most two tasks per worker in flight, answers
    in order. The same stage, reads and typed errors as on Ray, without Ray's start-up, its own
    processes and its object store (ADR 0027)."""
    import multiprocessing
    import shutil
    import tempfile
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor

    size = settings.screening.batch_size
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    workers = min(settings.batch.workers or max(1, os.cpu_count() or 1), len(chunks))
    # the model bytes reach the workers through a private file, not their start-up pipe: a large
    # message there blocks until each worker has started, so they would start one after another
    folder = Path(tempfile.mkdtemp(prefix="dxassist-batch-"))  # 0700
    pool: ProcessPoolExecutor | None = None
    pending: deque[Future[dict[str, np.ndarray]]] = deque()
    try:
        models_file = folder / "models.pickle"
        with open(os.open(models_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            pickle.dump(models, fh)
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),  # a fresh interpreter: no inherited threads or locks
            initializer=_local_worker_init,
            initargs=(settings, str(models_file)),
        )
        for chunk in chunks:
            pending.append(pool.submit(_local_worker_run, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(folder, ignore_errors=True)


def _ray_batches(
    rows: list[dict[str, str]],
    settings: Settings,
    shipped: list[ShippedModel],
    *,
    address: str | None,
    prepare_actors: int,
    infer_actors: int,
    infer_threads: int | None,
) -> Iterator[dict[str, np.ndarray]]:
    """The job's rows through Ray Data (ADR 0009, 0020), on the cluster at ``address`` or a Ray
    already running here, else a one-node Ray started (and stopped) here."""
    import ray

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        started_ray = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.verbose_stats_logs = False
        models = [ray.put(one) for one in shipped]
        batch_size, workers = settings.screening.batch_size, settings.batch.workers
        blocks = max(1, -(-len(rows) // batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        if not (started_ray and address is None):
            ds = _read_on_this_node(ds, settings.batch.max_file_bytes, blocks)
        # else this process's own one-node cluster: the actors read the files (same node,
        # same disk), saving the read tasks' worker processes and a copy of every file
        # through the object store (scripts/bench_batch_peers.py measured it)
        if choose_topology(settings.batch.topology) == "fused":
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            size = min(workers or max(1, int(cpus)), blocks)  # no idle actors on a small job
            ds = ds.map_batches(
                PrepareAndInferStage,
                fn_constructor_args=(settings, models, infer_threads or 1),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=min(1.0, cpus / size),
            )
        else:
            ds = ds.map_batches(
                PrepareStage,
                fn_constructor_args=(settings, models),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=prepare_actors),
                num_cpus=0.5,
            )
            ds = ds.map_batches(
                InferStage,
                fn_constructor_args=(settings, models, infer_threads),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=infer_actors),
                num_cpus=1,
                num_gpus=1 if cuda_device_count() > 0 else 0,
            )
        yield from _iter(ds)
    finally:
        if started_ray:
            ray.shutdown()


def _read_on_this_node(ds: Any, max_file_bytes: int, blocks: int) -> Any:
    """The input files are read where the driver runs (its node sees the folders it was given),
    one planned block of studies at a time; Ray Data's streaming executor reads ahead only as far as
    the object store budget of the next stage allows, so the bytes in flight stay bounded."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return ds.map_batches(
        read_inputs,
        fn_kwargs={"max_file_bytes": max_file_bytes},
        batch_size=None,  # one block of studies per task, as planned
        num_cpus=0,  # reading is I/O: it takes no core from the screening actors
        concurrency=min(2, blocks),
        label_selector={"ray.io/node-id": here},  # this node only (a hard constraint)
    )


def _iter(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
