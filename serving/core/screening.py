"""The screening core: DICOM instances of a study in, one ``ScreeningResult`` out.

``StudyScreener`` is a plain class (no Ray): the CLI, the Serve deployments and batch jobs all
call it. Its three stages can run apart (the Serve app puts ``prepare`` in the fetcher and
``infer`` in the model deployments):

1. ``prepare``  read -> header -> input QA/routing -> decode (reduced J2K) -> model preprocessing
2. ``infer``    batched ONNX Runtime inference per model
3. ``assemble`` the out-of-distribution gate, operating points, aggregate over images/frames,
   set triage priority

Two content gates stand before any finding: the content check inside ``prepare`` (header facts
and frame statistics, ``models.content``: CONTENT_MISMATCH) and each model version's
out-of-distribution gate in ``assemble`` (distance of the image's features to the model's
training data, ``models.ood``: OUT_OF_DISTRIBUTION). Only frames the gate accepts are scored.

Nothing an instance does can stop the others: every failure becomes a NOT_SCREENED image with a
reason code, and a study with no usable image is NOT_SCREENED with the most specific reason.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.decode import DecodedInstance, RoutePlanner
from models.decode_pool import Decoder, default_decoder
from models.errors import InferenceFailed, ReasonCode
from models.manifest import LoadedManifest, ModelManifest, OutputRoleValues
from models.predictor import OnnxPredictor, sigmoid
from models.results import (
    Finding,
    ImageResult,
    OutcomeValues,
    Region,
    ScreeningResult,
    StudyIdentity,
    findings_from_scores,
    new_result_id,
    region_from_map,
    triage_priority,
)
from serving.observability.phi import study_ref

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str] | bytes | BinaryIO


@dataclass
class InstanceInput:
    """One DICOM instance to screen. ``label`` names it for the caller (a file path, an
    instance number); it is returned in the result and never logged."""

    source: Source
    label: str


@dataclass
class PreparedImage:
    """An instance that passed QA: model inputs for its frames, and what is needed to map back."""

    label: str
    study_instance_uid: str
    sop_instance_uid: str
    model_id: str
    tensors: NDArray[np.float32]  # (frames, C, H, W)
    frame_indices: list[int]
    image_shape: tuple[int, int]  # rows, columns of the decoded frame
    header: Dataset | None = None  # the instance without pixel data: evidence for the SR


@dataclass
class RejectedImage:
    label: str
    study_instance_uid: str
    sop_instance_uid: str
    reason: ReasonCode
    detail: str
    identity: StudyIdentity | None = None  # when the header was readable


@dataclass
class ModelOutputs:
    """Raw outputs of one model for one prepared image (one row per frame)."""

    scores: NDArray[np.float32]  # (frames, labels) probabilities
    maps: NDArray[np.float32] | None  # (frames, labels, h, w) heatmap or mask probabilities
    map_role: OutputRoleValues | None = None
    batch_size: int = 0  # images in the model batch that produced this (0: unknown)
    #: out-of-distribution distance per frame (None: the model version has no gate)
    ood_distances: NDArray[np.float64] | None = None

    def rows(self, start: int, n: int, batch_size: int | None = None) -> ModelOutputs:
        """Frames ``start:start+n`` (one image of a joined batch), every per-frame array kept."""
        return ModelOutputs(
            scores=self.scores[start : start + n],
            maps=None if self.maps is None else self.maps[start : start + n],
            map_role=self.map_role,
            batch_size=self.batch_size if batch_size is None else batch_size,
            ood_distances=None if self.ood_distances is None else self.ood_distances[start : start + n],
        )


@dataclass
class _StudyWork:
    study_instance_uid: str
    prepared: list[PreparedImage] = field(default_factory=list)
    rejected: list[RejectedImage] = field(default_factory=list)


def _letterbox_region(region: Region, rows: int, cols: int) -> Region:
    """Map a region from letterboxed (square) model coordinates back to image fractions."""
    side = max(rows, cols)
    off_x, off_y = (side - cols) / 2 / side, (side - rows) / 2 / side
    sx, sy = side / cols, side / rows
    x0 = min(max((region.x - off_x) * sx, 0.0), 1.0)
    y0 = min(max((region.y - off_y) * sy, 0.0), 1.0)
    x1 = min(max((region.x + region.width - off_x) * sx, 0.0), 1.0)
    y1 = min(max((region.y + region.height - off_y) * sy, 0.0), 1.0)
    return Region(x=x0, y=y0, width=max(0.0, x1 - x0), height=max(0.0, y1 - y0))


def run_model(predictor: OnnxPredictor, tensors: NDArray[np.float32], batch_size: int) -> ModelOutputs:
    """Scores (probabilities) and maps (heatmap, or mask probabilities) for ``(N, C, H, W)``."""
    manifest = predictor.manifest
    heat = manifest.output(OutputRoleValues.HEATMAP)
    mask = manifest.output(OutputRoleValues.MASK)
    scores, maps, distances = [], [], []
    for start in range(0, len(tensors), batch_size):
        out = predictor.predict(tensors[start : start + batch_size])
        scores.append(predictor.scores(out))
        measured = predictor.ood_distances(out)
        if measured is not None:
            distances.append(measured)
        if heat is not None:
            maps.append(out[heat.name])
        elif mask is not None:
            maps.append(sigmoid(out[mask.name]) if mask.activation == "sigmoid" else out[mask.name])
    role = OutputRoleValues.HEATMAP if heat is not None else OutputRoleValues.MASK if mask is not None else None
    return ModelOutputs(
        scores=np.concatenate(scores),
        maps=np.concatenate(maps) if maps else None,
        map_role=role,
        batch_size=min(len(tensors), batch_size),
        ood_distances=np.concatenate(distances) if distances else None,
    )


def ood_refusal_detail(ref: str, distance: float, limit: float, frames: int) -> str:
    """Why the gate refused an image, in a radiologist's words, with the measured value."""
    if frames <= 1:
        return (
            f"the image does not look like the images {ref} was trained on "
            f"(distance {distance:.1f} > limit {limit:.1f}); no finding is given"
        )
    return (
        f"none of the image's {frames} frames looks like the images {ref} was trained on "
        f"(smallest distance {distance:.1f} > limit {limit:.1f}); no finding is given"
    )


class StudyScreener:
    """Screens studies with a set of verified predictors. Thread-safe; holds no per-study state."""

    def __init__(
        self,
        predictors: Sequence[OnnxPredictor],
        *,
        study_ref_key: bytes,
        max_frames_per_image: int = 32,
        batch_size: int = 4,
        manifests: Sequence[LoadedManifest] = (),
        decoder: Decoder | None = None,
        body_part_aliases: Mapping[str, str] | None = None,
    ) -> None:
        """``predictors`` run inference; ``manifests`` alone suffice for ``prepare`` and
        ``assemble`` (a fetcher or an ingress holds no ONNX session). ``decoder`` runs the
        decode boundary (``models.decode_pool``; default: the process's shared worker pool;
        the service passes the one its settings choose). ``body_part_aliases`` adds a
        site's local BodyPartExamined spellings to input QA's defaults (``models.qa``)."""
        self.predictors = {p.manifest.id: p for p in predictors}
        self.loaded: dict[str, LoadedManifest] = {m.manifest.id: m for m in manifests}
        self.loaded.update({p.manifest.id: p.loaded for p in predictors})
        if not self.loaded:
            raise ValueError("predictors/manifests: at least one model is required")
        self.manifests: list[ModelManifest] = [m.manifest for m in self.loaded.values()]
        self.study_ref_key = study_ref_key
        self.max_frames_per_image = max_frames_per_image
        self.batch_size = batch_size
        self.decoder = decoder
        self._planner = RoutePlanner(
            tuple(self.manifests), max_frames_per_image, tuple(sorted((body_part_aliases or {}).items()))
        )

    # -- stage 1 ---------------------------------------------------------------------------

    def prepare(self, item: InstanceInput) -> PreparedImage | RejectedImage:
        """Read, check, decode and preprocess one instance inside the decode boundary
        (``models.decode``): every failure, a crashed or hung decoder included, is a
        ``RejectedImage`` with a reason code. Never raises for bad input."""
        decoder = self.decoder if self.decoder is not None else default_decoder()
        outcome = decoder.prepare(item.source, self._planner)
        if isinstance(outcome, DecodedInstance):
            return PreparedImage(
                label=item.label,
                study_instance_uid=outcome.study_instance_uid,
                sop_instance_uid=outcome.sop_instance_uid,
                model_id=outcome.model_id,
                tensors=outcome.tensors,
                frame_indices=outcome.frame_indices,
                image_shape=outcome.image_shape,
                header=outcome.evidence,
            )
        return RejectedImage(
            item.label,
            outcome.study_instance_uid,
            outcome.sop_instance_uid,
            outcome.reason,
            outcome.detail,
            outcome.identity,
        )

    # -- stage 2 ---------------------------------------------------------------------------

    def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        """Run one model over ``(N, C, H, W)`` in batches of ``batch_size``."""
        return run_model(self.predictors[model_id], tensors, self.batch_size)

    # -- stage 3 ---------------------------------------------------------------------------

    def _image_findings(self, image: PreparedImage, outputs: ModelOutputs) -> list[Finding]:
        """Per-label best frame of one image, with its region mapped to image fractions."""
        loaded = self.loaded[image.model_id]
        best = outputs.scores.argmax(axis=0)
        findings = []
        for li in range(len(loaded.manifest.labels)):
            fi = int(best[li])
            region = None
            if outputs.maps is not None:
                fmap = outputs.maps[fi, li]
                if outputs.map_role == OutputRoleValues.MASK:
                    region = region_from_map(np.where(fmap >= 0.5, fmap, 0.0).astype(np.float32), level=1e-3)
                else:
                    region = region_from_map(fmap)
                if region is not None and loaded.manifest.input.preprocessing == "cxr_v1":
                    region = _letterbox_region(region, *image.image_shape)
            frame_no = image.frame_indices[fi] if len(image.frame_indices) > 1 else None
            finding = findings_from_scores(loaded, outputs.scores[fi])[li]
            findings.append(
                finding.model_copy(
                    update={"region": region, "frame_index": frame_no, "sop_instance_uid": image.sop_instance_uid}
                )
            )
        return findings

    def _gate(
        self, image: PreparedImage, outputs: ModelOutputs
    ) -> ImageResult | tuple[PreparedImage, ModelOutputs, float | None]:
        """The out-of-distribution gate: the accepted frames of an image (and its distance), or
        the image's NOT_SCREENED result when no frame is accepted. Fails closed: a version
        with a gate whose distances are missing gets no finding."""
        manifest = self.loaded[image.model_id].manifest
        spec = manifest.ood
        if spec is None:
            return image, outputs, None
        distances = outputs.ood_distances
        if distances is None or len(distances) != len(outputs.scores):
            return ImageResult(
                sop_instance_uid=image.sop_instance_uid,
                label=image.label,
                outcome=OutcomeValues.NOT_SCREENED,
                reason=ReasonCode.INFERENCE_FAILED,
                reason_detail=f"{manifest.ref}: the out-of-distribution gate was not measured; no finding is given",
                model_ref=manifest.ref,
            )
        accepted = np.flatnonzero(distances <= spec.threshold)
        if accepted.size == 0:
            closest = round(float(distances.min()), 2)  # the same figure in the detail and the field
            return ImageResult(
                sop_instance_uid=image.sop_instance_uid,
                label=image.label,
                outcome=OutcomeValues.NOT_SCREENED,
                reason=ReasonCode.OUT_OF_DISTRIBUTION,
                reason_detail=ood_refusal_detail(manifest.ref, closest, spec.threshold, len(distances)),
                model_ref=manifest.ref,
                ood_distance=closest,
            )
        distance = round(float(distances[accepted].max()), 2)
        if accepted.size == len(distances):
            return image, outputs, distance
        kept = replace(image, frame_indices=[image.frame_indices[i] for i in accepted])
        subset = ModelOutputs(
            scores=outputs.scores[accepted],
            maps=None if outputs.maps is None else outputs.maps[accepted],
            map_role=outputs.map_role,
            batch_size=outputs.batch_size,
            ood_distances=distances[accepted],
        )
        return kept, subset, distance

    def assemble(
        self,
        study_instance_uid: str,
        prepared: Sequence[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
        rejected: Sequence[RejectedImage],
        duration_ms: float = 0.0,
    ) -> ScreeningResult:
        """Combine image outcomes into the study result (max score per label over images).

        Each image meets its model's out-of-distribution gate first: an image none of whose
        frames is accepted is NOT_SCREENED (OUT_OF_DISTRIBUTION) and contributes no finding."""
        images: list[ImageResult] = [
            ImageResult(
                sop_instance_uid=r.sop_instance_uid,
                label=r.label,
                outcome=OutcomeValues.NOT_SCREENED,
                reason=r.reason,
                reason_detail=r.detail,
            )
            for r in rejected
        ]
        best: dict[tuple[str, str], Finding] = {}
        for image, outputs in prepared:
            ref = self.loaded[image.model_id].manifest.ref
            if isinstance(outputs, InferenceFailed):
                images.append(
                    ImageResult(
                        sop_instance_uid=image.sop_instance_uid,
                        label=image.label,
                        outcome=OutcomeValues.NOT_SCREENED,
                        reason=ReasonCode.INFERENCE_FAILED,
                        reason_detail=str(outputs),
                        model_ref=ref,
                    )
                )
                continue
            gated = self._gate(image, outputs)
            if isinstance(gated, ImageResult):
                images.append(gated)
                continue
            image, outputs, distance = gated
            images.append(
                ImageResult(
                    sop_instance_uid=image.sop_instance_uid,
                    label=image.label,
                    outcome=OutcomeValues.SCREENED,
                    model_ref=ref,
                    frames_screened=len(image.frame_indices),
                    ood_distance=distance,
                )
            )
            for finding in self._image_findings(image, outputs):
                key = (finding.model_id, finding.key)
                if key not in best or finding.score > best[key].score:
                    best[key] = finding
        screened = [i for i in images if i.outcome == OutcomeValues.SCREENED]
        sref = study_ref(study_instance_uid, self.study_ref_key) if study_instance_uid else ""
        header = next((image.header for image, _ in prepared if image.header is not None), None)
        # who the study is: from a screened image's header, else from a rejected one that was readable
        identities = [StudyIdentity.from_header(header)] if header is not None else []
        identities += [r.identity for r in rejected if r.identity is not None]
        identity = identities[0] if identities else StudyIdentity()
        result_id = new_result_id()
        if not screened:
            reasons = {i.reason for i in images}
            if len(reasons) == 1 and images:
                reason, detail = images[0].reason, images[0].reason_detail
            else:
                reason, detail = ReasonCode.NO_USABLE_IMAGE, f"none of {len(images)} images could be screened"
            return ScreeningResult(
                study_instance_uid=study_instance_uid,
                study_ref=sref,
                outcome=OutcomeValues.NOT_SCREENED,
                reason=reason,
                reason_detail=detail,
                images=images,
                duration_ms=round(duration_ms, 1),
                result_id=result_id,
                **identity.model_dump(),
            )
        findings = sorted(best.values(), key=lambda f: (f.model_id, f.key))
        return ScreeningResult(
            study_instance_uid=study_instance_uid,
            study_ref=sref,
            outcome=OutcomeValues.SCREENED,
            result_id=result_id,
            **identity.model_dump(),
            priority=triage_priority(findings),
            findings=findings,
            images=images,
            models=sorted({i.model_ref for i in screened if i.model_ref}),
            duration_ms=round(duration_ms, 1),
        )

    # -- all stages ------------------------------------------------------------------------

    def screen_studies(
        self, items: Iterable[InstanceInput], *, group_by_study: bool = True
    ) -> list[tuple[ScreeningResult, list[tuple[PreparedImage, ModelOutputs | InferenceFailed]]]]:
        """Screen instances, grouped into studies by Study Instance UID (or one per item); each
        result with its images' model outputs (what the DICOM result objects are drawn from)."""
        studies: dict[str, _StudyWork] = {}
        for n, item in enumerate(items):
            outcome = self.prepare(item)
            uid = outcome.study_instance_uid
            key = uid if (group_by_study and uid) else f"#{n}"
            work = studies.setdefault(key, _StudyWork(uid))
            if isinstance(outcome, PreparedImage):
                work.prepared.append(outcome)
            else:
                work.rejected.append(outcome)
        done = []
        for work in studies.values():
            paired: list[tuple[PreparedImage, ModelOutputs | InferenceFailed]] = []
            for image in work.prepared:
                try:
                    paired.append((image, self.infer(image.model_id, image.tensors)))
                except InferenceFailed as exc:
                    paired.append((image, exc))
            result = self.assemble(work.study_instance_uid, paired, work.rejected)
            done.append((result, paired))
            logger.info(
                "study screened",
                extra={
                    "study_ref": result.study_ref,
                    "outcome": result.outcome.value,
                    "reason": result.reason.value if result.reason else None,
                    "stage": "screen",
                },
            )
        return done

    def screen(self, items: Iterable[InstanceInput], *, group_by_study: bool = True) -> list[ScreeningResult]:
        """Screen instances, grouped into studies by Study Instance UID (or one per item)."""
        start = time.perf_counter()
        results = [r for r, _ in self.screen_studies(items, group_by_study=group_by_study)]
        elapsed = (time.perf_counter() - start) * 1000.0
        share = elapsed / max(1, len(results))
        return [r.model_copy(update={"duration_ms": round(share, 1)}) for r in results]


def screen_paths(
    screener: StudyScreener, paths: Sequence[Path], *, group_by_study: bool = True
) -> list[ScreeningResult]:
    return screener.screen((InstanceInput(p, str(p)) for p in paths), group_by_study=group_by_study)
