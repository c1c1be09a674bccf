"""ONNX Runtime predictor: a verified manifest + an InferenceSession + a batch API.

The artifact's sha256 is checked before a session is created (``ModelIntegrityError``), and
the session's input/output signature is checked against the manifest (``ManifestError``).
When the manifest declares an out-of-distribution gate, its statistics are verified and loaded
with the session, and ``ood_distances`` turns the ``features`` output into one distance per row.
CUDA (and, when asked, TensorRT) are requested only when a GPU is really present, so a CPU
machine with onnxruntime-gpu installed falls back cleanly and without error lines;
``provider`` reports what the session really runs on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final, Literal

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from models.errors import InferenceFailed, ManifestError
from models.manifest import LoadedManifest, ModelManifest, OutputRoleValues, load_manifest, verify_artifact
from models.ood import OodGate

logger = logging.getLogger(__name__)

ProviderPreference = Literal["auto", "cpu", "cuda", "tensorrt"]

_ORT_DTYPES: Final = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
}


@cache
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 when there is no driver or no GPU."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if libcuda.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def choose_providers(
    preference: ProviderPreference = "auto",
    device_id: int = 0,
    *,
    available: set[str] | None = None,
    gpu: bool | None = None,
) -> list[str | tuple[str, dict[str, object]]]:
    """Execution providers to ask for, best first; CPU is always last. ``available`` and ``gpu``
    default to what this machine's ONNX Runtime build and driver report."""
    available = set(ort.get_available_providers()) if available is None else available
    gpu = cuda_device_count() > 0 if gpu is None else gpu
    providers: list[str | tuple[str, dict[str, object]]] = []
    if preference == "tensorrt" and gpu and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": device_id, "trt_engine_cache_enable": True}))
    if preference in ("auto", "cuda", "tensorrt") and gpu and "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    providers.append("CPUExecutionProvider")
    return providers


@dataclass(frozen=True, slots=True)
class SelfTest:
    """Outcome of a one-batch self-test on a synthetic input."""

    ok: bool
    latency_ms: float
    provider: str


#: ONNX metadata key holding the output (label) order, comma-separated label keys
LABEL_ORDER_KEY = "dxassist.label_order"

#: Set by a caller that knows a run has the machine to itself (the online service, when one
#: screening is under way and nothing waits): ``predict`` then uses the lone-run session, if the
#: predictor has one and no other run holds it. Context-local, so it follows ``asyncio.to_thread``.
RUN_ALONE: ContextVar[bool] = ContextVar("dxassist_run_alone", default=False)
#: held by the one lone run of this process (of any predictor): two would share the cores
_LONE_RUN = threading.Lock()


def _session_options(threads: int, spinning: bool, spin_after_run: bool, cpu_mem_arena: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # off: each run's buffers go back to the allocator instead of an arena that keeps the
    # largest concurrent peak for the life of the session (the service's memory after a burst)
    options.enable_cpu_mem_arena = cpu_mem_arena
    if not spinning:
        # idle ORT threads sleep instead of spinning: when decode, HTTP and other replicas
        # share the cores, spinning burns the CPU they need (measured in ADR 0011)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_after_run:
        # threads spin while a run is under way (quick hand-offs between its operators) and
        # stop when it ends, instead of burning a core for a while after every run
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxPredictor:
    """Run one verified model. Thread-safe for ``predict`` (ORT sessions are)."""

    def __init__(
        self,
        loaded: LoadedManifest,
        *,
        providers: ProviderPreference = "auto",
        intra_op_threads: int | None = None,
        allow_spinning: bool = True,
        spin_after_run: bool = True,
        cpu_mem_arena: bool = True,
        lone_run_session: bool = False,
    ) -> None:
        """``lone_run_session``: on CPU, open a second session for runs that have the machine to
        themselves (``RUN_ALONE``): every core, threads spinning while the run is under way."""
        self.loaded = loaded
        self.manifest: ModelManifest = loaded.manifest
        artifact = verify_artifact(loaded)  # before any session exists
        cores = max(1, os.cpu_count() or 1)
        self.session = self._open(
            artifact,
            _session_options(intra_op_threads or cores, allow_spinning, spin_after_run, cpu_mem_arena),
            choose_providers(providers),
        )
        self._check_signature()
        self._check_label_order()
        self.provider: str = self.session.get_providers()[0]
        self._outputs = [o.name for o in self.manifest.outputs]
        #: the version's out-of-distribution gate (None for a version fitted without one)
        self.ood: OodGate | None = OodGate.of(loaded)
        #: the lone-run session (None: every run uses ``session``)
        self._lone: ort.InferenceSession | None = None
        if lone_run_session and self.provider == "CPUExecutionProvider" and cores > 1:
            options = _session_options(cores, True, False, cpu_mem_arena)
            self._lone = self._open(artifact, options, ["CPUExecutionProvider"])

    def _open(
        self, artifact: Path, options: ort.SessionOptions, providers: list[str | tuple[str, dict[str, object]]]
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(artifact), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ManifestError(
                f"{self.manifest.ref}: ONNX Runtime refused the artifact ({type(exc).__name__})"
            ) from exc

    @classmethod
    def from_path(cls, manifest_path: str | Path, **kwargs: object) -> OnnxPredictor:
        return cls(load_manifest(manifest_path), **kwargs)  # type: ignore[arg-type]

    def _check_label_order(self) -> None:
        """The artifact's recorded output order (written by the exporter from the manifest) must
        be the manifest's label order: findings are named by position. Artifacts exported
        before the order was recorded carry none and are trusted to their parity check."""
        recorded = self.session.get_modelmeta().custom_metadata_map.get(LABEL_ORDER_KEY)
        expected = ",".join(label.key for label in self.manifest.labels)
        if recorded is not None and recorded != expected:
            raise ManifestError(
                f"{self.manifest.ref}: the artifact's outputs are in another order than the manifest's labels"
            )

    def _check_signature(self) -> None:
        ref = self.manifest.ref
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ManifestError(f"{ref}: artifact has {len(inputs)} inputs, manifest declares 1")
        spec = self.manifest.input
        got = inputs[0]
        if got.name != spec.name or len(got.shape) != len(spec.shape) or got.type != _ORT_DTYPES[spec.dtype]:
            raise ManifestError(
                f"{ref}: artifact input {got.name}{got.shape} {got.type} does not match manifest "
                f"{spec.name}{spec.shape} {spec.dtype}"
            )
        for declared, actual in zip(spec.shape[1:], got.shape[1:], strict=True):
            if isinstance(actual, int) and actual != declared:
                raise ManifestError(f"{ref}: artifact input shape {got.shape} does not match manifest {spec.shape}")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for out in self.manifest.outputs:
            actual_out = outputs.get(out.name)
            if actual_out is None:
                raise ManifestError(f"{ref}: artifact has no output {out.name!r}")
            if len(actual_out.shape) != len(out.shape) or actual_out.type != _ORT_DTYPES[out.dtype]:
                raise ManifestError(f"{ref}: artifact output {out.name!r} rank or dtype differs from manifest")
            for declared, actual in zip(out.shape[1:], actual_out.shape[1:], strict=True):
                if isinstance(actual, int) and actual != declared:
                    raise ManifestError(f"{ref}: artifact output {out.name!r} shape differs from manifest")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest.input.shape[1:]
        return c, h, w

    def predict(self, batch: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """Run a batch ``(N, C, H, W)``; returns every declared output by name.

        Raises:
            InferenceFailed: wrong input shape, runtime error, or a non-finite output (a NaN
                must never be read as a negative finding).
        """
        ref = self.manifest.ref
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape or batch.shape[0] < 1:
            raise InferenceFailed(f"{ref}: batch shape {batch.shape} does not fit input {self.manifest.input.shape}")
        if batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        if not np.isfinite(batch).all():
            raise InferenceFailed(f"{ref}: input batch contains non-finite values")
        session, lone = self.session, False
        if self._lone is not None and RUN_ALONE.get() and _LONE_RUN.acquire(blocking=False):
            session, lone = self._lone, True
        try:
            results = session.run(self._outputs, {self.manifest.input.name: batch})
        except Exception as exc:
            raise InferenceFailed(f"{ref}: ONNX Runtime failed ({type(exc).__name__})") from exc
        finally:
            if lone:
                _LONE_RUN.release()
        out = {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._outputs, results, strict=True)}
        for name, value in out.items():
            if not np.isfinite(value).all():
                raise InferenceFailed(f"{ref}: output {name!r} contains non-finite values")
        return out

    def scores(self, outputs: dict[str, NDArray[np.float32]]) -> NDArray[np.float32]:
        """Probabilities ``(N, labels)`` from the ``scores`` output (sigmoid applied if declared)."""
        spec = self.manifest.output(OutputRoleValues.SCORES)
        assert spec is not None  # guaranteed by the manifest validator
        raw = outputs[spec.name].reshape(outputs[spec.name].shape[0], -1)
        if spec.activation == "sigmoid":
            return sigmoid(raw)
        return raw

    def ood_distances(self, outputs: dict[str, NDArray[np.float32]]) -> NDArray[np.float64] | None:
        """Mahalanobis distance of each row's features to the training data (``None``: no gate)."""
        if self.ood is None:
            return None
        return self.ood.decide(outputs[self.ood.features_output]).distances

    def self_test(self) -> SelfTest:
        """One batch of a smooth synthetic image; checks shapes and finiteness (readiness probe)."""
        c, h, w = self.input_shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        image = (0.5 + 0.25 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.float32)
        batch = np.broadcast_to(image, (1, c, h, w)).copy()
        start = time.perf_counter()
        try:
            out = self.predict(batch)
            ok = all(v.shape[0] == 1 for v in out.values())
        except InferenceFailed:
            ok = False
        return SelfTest(ok=ok, latency_ms=(time.perf_counter() - start) * 1000.0, provider=self.provider)


def sigmoid(x: NDArray[np.float32]) -> NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))).astype(np.float32)
