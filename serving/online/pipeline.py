"""Where the heavy stages of a screening run: the ``Pipeline`` seam between the service and compute.

``ScreeningService`` talks only to a ``Pipeline`` (prepare a study, infer per model).
``LocalPipeline`` runs the ``StudyScreener`` in worker
threads of this process; ``serving.rayserve.app`` provides the ones that call Serve deployments.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from models.decode_pool import shared_decoder
from models.errors import UploadUnavailable
from models.predictor import OnnxPredictor
from serving.core.screening import InstanceInput, ModelOutputs, PreparedImage, RejectedImage, StudyScreener
from serving.dicom.sources import StudySource
from serving.settings import Settings


@dataclass(frozen=True)
class StudyRequest:
    """What to screen: a study in the configured store, or the instances of an upload or of a
    pushed study as bytes (``files``: read from the results database by the ingress and carried
    with the request to whichever node prepares it). ``spool_dir`` is a local folder: only jobs
    admitted before uploads moved into the database name one."""

    study_instance_uid: str | None = None
    spool_dir: str | None = None
    files: tuple[bytes, ...] = ()


@dataclass
class PreparedStudy:
    prepared: list[PreparedImage] = field(default_factory=list)
    rejected: list[RejectedImage] = field(default_factory=list)


class Pipeline(Protocol):
    """The heavy stages, wherever they run (threads here, Serve deployments in ``serving.rayserve.app``)."""

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy: ...

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs: ...

    async def model_info(self) -> list[dict[str, object]]: ...


def model_status(predictor: OnnxPredictor) -> dict[str, object]:
    """Model id, version, provider and whether its self-test passes (readiness, metrics)."""
    m = predictor.manifest
    return {"model": m.id, "version": m.version, "provider": predictor.provider, "ready": predictor.self_test().ok}


def spooled_instances(spool_dir: Path) -> list[InstanceInput]:
    """The instances of a local spool folder; ``UploadUnavailable`` when the folder is not here
    (another node's disk, or removed): a retryable error, never an empty study."""
    if not spool_dir.is_dir():
        raise UploadUnavailable("the upload's spool folder is not on this node")
    return [InstanceInput(p, f"upload/{p.name}") for p in sorted(spool_dir.glob("*.dcm"))]


def request_instances(files: tuple[bytes, ...]) -> list[InstanceInput]:
    return [InstanceInput(data, f"upload/{i:05d}.dcm") for i, data in enumerate(files)]


def prepare_request(screener: StudyScreener, source: StudySource, request: StudyRequest) -> PreparedStudy:
    """Stage 1 for one study request (blocking; run it in a thread or a fetcher replica)."""
    if request.files:
        items = request_instances(request.files)
    elif request.spool_dir:
        items = spooled_instances(Path(request.spool_dir))
    else:
        items = source.instances(request.study_instance_uid or "")
    out = PreparedStudy()
    for item in items:
        prepared = screener.prepare(item)
        if isinstance(prepared, PreparedImage):
            out.prepared.append(prepared)
        else:
            out.rejected.append(prepared)
    return out


class LocalPipeline:
    """Runs the screener's stages in worker threads of this process."""

    def __init__(self, screener: StudyScreener, source: StudySource) -> None:
        self.screener = screener
        self.source = source

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        return await asyncio.to_thread(prepare_request, self.screener, self.source, request)

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        return await asyncio.to_thread(self.screener.infer, model_id, tensors)

    async def model_info(self) -> list[dict[str, object]]:
        return [await asyncio.to_thread(model_status, p) for p in self.screener.predictors.values()]


def screener_options(settings: Settings) -> dict[str, Any]:
    """The ``StudyScreener`` keyword arguments the settings decide, for every place that builds
    one (``factory.build_screener``, the versioned screeners): key, frames, batch, decoder, aliases."""
    return {
        "study_ref_key": settings.security.study_ref_key.get_secret_value().encode(),
        "max_frames_per_image": settings.screening.max_frames_per_image,
        "batch_size": settings.screening.batch_size,
        "decoder": shared_decoder(settings.screening.decode_isolation, settings.screening.decode_workers),
        "body_part_aliases": settings.screening.body_part_aliases,
    }
