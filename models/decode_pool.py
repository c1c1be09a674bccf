"""Untrusted decode in replaceable worker processes.

A native abort in a codec (a Rust panic that aborts, a C library's ``abort()`` or segfault, the
kernel killing an allocation) must not take the service or a batch actor down. ``DecodePool``
runs ``models.decode.prepare_instance`` in a few long-lived worker processes:

* each worker is a fresh interpreter (``python -m models.decode_pool``) that caps its own address space (``RLIMIT_AS``) at what it holds after start-up plus
  ``DecodeLimits.worker_memory_bytes``, so one file's peak RSS stays within that budget
  whatever the file declares (an allocation past it is a ``MemoryError`` or an abort);
* the parent kills a worker that has spent ``DecodeLimits.file_timeout_s`` of CPU on one file,
  or ``file_wall_timeout_s`` of wall clock (CPU time, so that a loaded machine is no "hang");
* a worker that dies or times out is replaced on the next file, and only the file it held is
  answered ``DECODE_FAILED``; a worker whose resident set stayed high after a file (allocator
  high-water after a large image) is replaced too, so no file leaves memory behind;
* only model-sized tensors and the evidence header come back; the full-size frame stays in
  the worker.

``InlineDecoder`` has the same interface without isolation (tests, benchmarks, training);
``make_decoder`` builds either (``process``, the default, or ``inline``); the service takes the
choice from its settings (``screening.decode_isolation``, ``screening.decode_workers``). The
choice and its measured cost are in docs/adr/0013-decode-boundary.md.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO, Final, Protocol

from models.decode import (
    FAULT_TIMEOUT,
    FAULT_WORKER_DIED,
    DecodeOutcome,
    DecodeRejection,
    Planner,
    prepare_instance,
)
from models.errors import InputRejected, ReasonCode
from models.heap import keep_heap_for_reuse, trim_heap
from models.limits import DEFAULT_LIMITS, DecodeLimits
from models.pixels import read_source

_START_TIMEOUT_S: Final = 120.0
#: a worker without a file for this long gives its kept heap back (``models.heap.trim_heap``)
_IDLE_TRIM_S: Final = 2.0
#: Worker environment: single-threaded numeric libraries, few malloc arenas (address space);
#: Rust panics (pylibjpeg-rle) print one line, not a backtrace.
_WORKER_ENV: Final = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "RUST_BACKTRACE": "0",
}
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


class Decoder(Protocol):
    """Something that turns one untrusted instance into a ``DecodeOutcome``. Thread-safe."""

    def prepare(self, source: str | os.PathLike[str] | bytes | BinaryIO, planner: Planner) -> DecodeOutcome: ...

    def close(self) -> None: ...


class InlineDecoder:
    """``prepare_instance`` in the calling process: no isolation from native aborts or hangs."""

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits

    def prepare(self, source: str | os.PathLike[str] | bytes | BinaryIO, planner: Planner) -> DecodeOutcome:
        src = str(source) if isinstance(source, os.PathLike) else source
        return prepare_instance(src, planner, self.limits)

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Worker side


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _limit_worker(limits: DecodeLimits) -> int:
    """Quiet, single-threaded, address space capped; returns the cap in bytes."""
    import resource
    import signal
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    # frame-sized buffers reused from file to file, not faulted in afresh for each (models.heap):
    # a 1024 px radiograph decoded in 6 ms instead of 10; given back once the worker idles
    keep_heap_for_reuse()
    warnings.simplefilter("ignore")  # library warnings can quote header values; never printed
    import cv2

    cv2.setNumThreads(1)
    # load every codec now, so that the baseline below includes their libraries
    for name in ("openjpeg", "libjpeg", "rle", "pylibjpeg", "PIL.JpegImagePlugin", "PIL.Jpeg2KImagePlugin"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    cap = _status_bytes("VmSize:") + limits.worker_memory_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _reset_peak() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) so that each file's peak is measured alone


def _worker_main(conn: Connection, limits: DecodeLimits) -> None:
    """Loop: receive (source, planner or None for the last one), answer (outcome, stats);
    ``None`` ends the loop."""
    planner: Planner | None = None
    cap = _limit_worker(limits)
    # what start-up loaded lives as long as the worker: out of every collection, and out of the
    # final one at exit (a worker stops sooner)
    gc.freeze()
    conn.send({"ready": True, "address_space_cap": cap, "rss": _status_bytes("VmRSS:")})
    while True:
        try:
            if not conn.poll(_IDLE_TRIM_S):  # no file for a while: the kept heap goes back, once
                trim_heap()
                conn.poll(None)
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        source, sent_planner = job
        if sent_planner is not None:
            planner = sent_planner  # kept for the next files: it is sent again only when it changes
        assert planner is not None
        _reset_peak()
        started = time.perf_counter()
        outcome = prepare_instance(source, planner, limits)
        stats = {
            "peak_rss": _status_bytes("VmHWM:"),
            "rss": _status_bytes("VmRSS:"),
            "seconds": time.perf_counter() - started,
        }
        try:
            conn.send((outcome, stats))
        except (EOFError, OSError):
            return
        except Exception as exc:  # an outcome that does not pickle: answer a rejection instead
            conn.send(
                (
                    DecodeRejection(
                        "", "", ReasonCode.DECODE_FAILED, f"result could not be returned ({type(exc).__name__})"
                    ),
                    stats,
                )
            )


# --------------------------------------------------------------------------------------------
# Parent side


@dataclass
class PoolStats:
    """What the isolation had to do; the fuzz suite reads these."""

    files: int = 0
    workers_started: int = 0
    worker_deaths: int = 0
    timeouts: int = 0
    recycled: int = 0
    peak_rss_bytes: int = 0  # highest per-file peak RSS of any worker
    address_space_cap: int = 0
    faults: dict[str, int] = field(default_factory=dict)


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    planner: Planner | None = None  # the planner this worker holds (sent once, then reused)


class DecodePool:
    """A few worker processes running ``prepare_instance``; see the module docstring.

    Workers start on first use (``warm`` starts them ahead). Thread-safe: up to ``workers``
    callers decode at once, the others wait for a free worker.
    """

    def __init__(self, workers: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
        self.limits = limits
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.workers)
        self._closed = False
        self.stats = PoolStats()

    # -- workers ---------------------------------------------------------------------------

    def _start(self) -> _Worker:
        """A fresh interpreter running this module (not a fork of the service: no inherited
        threads, locks or Ray state, and no re-import of the service's ``__main__``)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update(_WORKER_ENV)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "models.decode_pool", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # codec chatter goes to stderr: stdout may carry the CLI's --json output
                env=env,
            )
        finally:
            theirs.close()
        worker = _Worker(process, Connection(ours.detach()))
        try:
            worker.conn.send({"sys_path": list(sys.path), "limits": self.limits})
            if not worker.conn.poll(_START_TIMEOUT_S):
                raise OSError("decode worker did not start")
            hello = worker.conn.recv()
        except BaseException:
            self._kill(worker)
            raise
        with self._lock:
            self.stats.workers_started += 1
            self.stats.address_space_cap = int(hello.get("address_space_cap", 0))
        return worker

    @staticmethod
    def _kill(worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            worker.conn.close()
        if worker.process.poll() is None:
            worker.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=5)

    def warm(self) -> None:
        """Start every worker now (a service does this at start-up, off the request path)."""
        started = [self._start() for _ in range(self.workers - len(self._idle))]
        with self._lock:
            self._idle.extend(started)

    def close(self) -> None:
        """Stop the workers (idle ones at once; busy ones when their file is done)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:  # all told first, so that they wind down together
            with contextlib.suppress(Exception):
                worker.conn.send(None)
        deadline = time.monotonic() + 2.0
        for worker in idle:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(worker)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one file --------------------------------------------------------------------------

    def _count(self, fault: str) -> None:
        with self._lock:
            self.stats.faults[fault] = self.stats.faults.get(fault, 0) + 1

    def prepare(self, source: str | os.PathLike[str] | bytes | BinaryIO, planner: Planner) -> DecodeOutcome:
        """``prepare_instance`` in a worker. Never raises for bad input, nor for a worker that
        dies or hangs on it (``DECODE_FAILED`` with ``fault`` set)."""
        if isinstance(source, str | os.PathLike):
            payload: str | bytes = str(Path(source))
        else:
            try:
                payload = read_source(source, self.limits)
            except InputRejected as exc:
                return DecodeRejection("", "", exc.reason, exc.detail)
        with self._slots:
            with self._lock:
                if self._closed:
                    raise RuntimeError("decode pool is closed")
                worker = self._idle.pop() if self._idle else None
                self.stats.files += 1
            try:
                if worker is None:
                    worker = self._start()
            except Exception:  # the worker could not be started (fork failed, no memory...)
                self._count(FAULT_WORKER_DIED)
                return DecodeRejection(
                    "", "", ReasonCode.DECODE_FAILED, "decoder process could not start", fault=FAULT_WORKER_DIED
                )
            return self._run(worker, payload, planner)

    def _wait(self, worker: _Worker) -> bool:
        """Wait for the worker's answer: ``False`` once it has used ``file_timeout_s`` of CPU on
        this file, or ``file_wall_timeout_s`` have passed (blocked, or starved for CPU)."""
        started, cpu_start = time.monotonic(), _cpu_seconds(worker.process.pid)
        while True:
            left = self.limits.file_wall_timeout_s - (time.monotonic() - started)
            if left <= 0:
                return False
            if worker.conn.poll(min(1.0, left, self.limits.file_timeout_s)):
                return True
            if _cpu_seconds(worker.process.pid) - cpu_start >= self.limits.file_timeout_s:
                return False

    def _send(self, worker: _Worker, payload: str | bytes, planner: Planner) -> None:
        """The job to the worker, with the planner only when it is not the one the worker holds
        (a planner carries the model manifests: unpickling them cost about a millisecond a file)."""
        worker.conn.send((payload, None if planner is worker.planner else planner))
        worker.planner = planner

    def _run(self, worker: _Worker, payload: str | bytes, planner: Planner) -> DecodeOutcome:
        try:
            self._send(worker, payload, planner)
            if not self._wait(worker):
                self._kill(worker)
                with self._lock:
                    self.stats.timeouts += 1
                self._count(FAULT_TIMEOUT)
                return DecodeRejection(
                    "",
                    "",
                    ReasonCode.DECODE_FAILED,
                    f"decoding took longer than {self.limits.file_timeout_s:g} CPU seconds "
                    f"(or {self.limits.file_wall_timeout_s:g} s)",
                    fault=FAULT_TIMEOUT,
                )
            outcome: DecodeOutcome
            stats: dict[str, Any]
            outcome, stats = worker.conn.recv()
        except (EOFError, OSError):
            self._kill(worker)
            with self._lock:
                self.stats.worker_deaths += 1
            self._count(FAULT_WORKER_DIED)
            return DecodeRejection(
                "", "", ReasonCode.DECODE_FAILED, "decoder process ended abnormally", fault=FAULT_WORKER_DIED
            )
        except BaseException:
            self._kill(worker)
            raise
        keep = int(stats.get("rss", 0)) <= self.limits.worker_recycle_rss_bytes
        with self._lock:
            self.stats.peak_rss_bytes = max(self.stats.peak_rss_bytes, int(stats.get("peak_rss", 0)))
            if not keep:
                self.stats.recycled += 1
            keep = keep and not self._closed
            if keep:
                self._idle.append(worker)
        if not keep:
            self._kill(worker)
        outcome.stats = stats
        if isinstance(outcome, DecodeRejection):
            if outcome.fault:
                self._count(outcome.fault)
        return outcome


def make_decoder(
    isolation: str = "process", *, workers: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> Decoder:
    """``DecodePool`` (``process``, the default; ``workers`` defaults to ``min(4, cores)``) or
    ``InlineDecoder`` (``inline``).

    Raises:
        ValueError: an unknown isolation name.
    """
    name = isolation.strip().lower()
    if name == "process":
        return DecodePool(workers, limits)
    if name == "inline":
        return InlineDecoder(limits)
    raise ValueError(f"unknown decode isolation {name!r} (process or inline)")


_shared: dict[tuple[str, int | None], Decoder] = {}
_shared_lock = threading.Lock()


def shared_decoder(isolation: str = "process", workers: int | None = None) -> Decoder:
    """The process-wide decoder for this choice, created on first use and shared by every
    screener in the process, so that tests, CLI runs and Ray actors start one set of workers."""
    key = (isolation.strip().lower(), workers)
    with _shared_lock:
        if key not in _shared:
            decoder = make_decoder(isolation, workers=workers)
            atexit.register(decoder.close)
            _shared[key] = decoder
        return _shared[key]


def default_decoder() -> Decoder:
    """``shared_decoder()``: process isolation with the default pool size."""
    return shared_decoder()


if __name__ == "__main__":  # a worker: python -m models.decode_pool FD
    _conn = Connection(int(sys.argv[1]))
    _config = _conn.recv()
    sys.path[:] = list(dict.fromkeys([*sys.path, *_config["sys_path"]]))
    _worker_main(_conn, _config["limits"])
