"""The model manifest: the typed contract between a trained artifact and everything that runs it.

A manifest is YAML beside its ONNX file (``models/registry/<id>/<version>/manifest.yaml``).
``load_manifest`` parses it into frozen pydantic models that reject unknown keys, then
``verify_artifact`` streams the artifact through sha256 before anyone may open a session.
Thresholds and their basis live here and change only with a new version (ADR 0006).
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import ManifestError, ModelIntegrityError

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
_MODEL_ID = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha256_hex(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    return value


#: a sha256 digest as the manifest writes it: 64 lower-case hex digits
Sha256 = Annotated[str, AfterValidator(_sha256_hex)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodingSchemeValues(StrEnum):
    """Coding schemes a label code may use (DICOM Coding Scheme Designators)."""

    SCT = "SCT"  # SNOMED CT
    RADLEX = "RADLEX"
    DCM = "DCM"


class TaskValues(StrEnum):
    CLASSIFICATION = "classification"
    SEGMENTATION = "segmentation"


class Code(_Frozen):
    """A coded concept (DICOM code sequence item / FHIR Coding)."""

    scheme: CodingSchemeValues
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class Accepts(_Frozen):
    """What the model accepts. An image outside any of these lists is NOT_SCREENED.

    Empty ``body_part_examined`` or ``view_position`` lists mean "not checked". ``""`` inside a
    list accepts images that lack the attribute.
    """

    sop_class_uid: list[str] = Field(default_factory=list)
    modality: list[str] = Field(min_length=1)
    body_part_examined: list[str] = Field(default_factory=list)
    view_position: list[str] = Field(default_factory=list)
    photometric_interpretation: list[str] = Field(min_length=1)
    samples_per_pixel: Literal[1, 3]
    min_side: int = Field(default=128, ge=32)


class TensorSpec(_Frozen):
    name: str
    shape: list[int]
    dtype: Literal["float32", "float16", "int8", "uint8"]


class InputSpec(TensorSpec):
    #: the predictor feeds float32 tensors (preprocessing's output); no other input type runs
    dtype: Literal["float32"]
    value_range: tuple[float, float]
    preprocessing: str

    @field_validator("shape")
    @classmethod
    def _nchw(cls, shape: list[int]) -> list[int]:
        if len(shape) != 4 or shape[0] != -1 or any(d <= 0 for d in shape[1:]):
            raise ValueError("input shape must be [-1, C, H, W] with a dynamic batch dimension")
        return shape


class OutputRoleValues(StrEnum):
    SCORES = "scores"  # one channel per label
    HEATMAP = "heatmap"  # class activation map, one channel per label
    MASK = "mask"  # segmentation logits, one channel per label
    FEATURES = "features"  # pooled intermediate features for the out-of-distribution gate


class OutputSpec(TensorSpec):
    role: OutputRoleValues
    activation: Literal["sigmoid", "none"] = "sigmoid"


class OodSpec(_Frozen):
    """The out-of-distribution gate of this version (models/ood.py): what it measures, the
    fitted statistics file beside the artifact (sha256 checked like the artifact), the distance
    limit and how that limit was chosen, and the gate's measured evaluation."""

    method: Literal["mahalanobis"]
    features_output: str
    stats_file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+\.npz$")]
    stats_sha256: Sha256
    threshold: float = Field(gt=0.0)
    acceptance_target: float = Field(gt=0.5, lt=1.0)
    basis: Annotated[str, Field(min_length=10)]
    metrics: dict[str, float] = Field(default_factory=dict)


class Label(_Frozen):
    """One finding the model reports, with its operating point."""

    key: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    display: str
    code: Code
    body_site: Code
    threshold: float = Field(gt=0.0, lt=1.0)
    threshold_basis: Annotated[str, Field(min_length=10)]
    critical: bool = False


class Artifact(_Frozen):
    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")]
    sha256: Sha256
    opset: int = Field(ge=13)


class DataKindValues(StrEnum):
    """Where a version's training data came from (``provenance.data.kind``)."""

    SYNTHETIC = "synthetic"  # the project's generators (models/synthetic), no patient data
    FOLDER = "folder"  # a labelled folder in a public dataset's layout, as given
    STORE_EXPORT = "store-export"  # ``dxassist export``: the site's DICOM store, de-identified


class TrainingData(_Frozen):
    """What a version was really trained on, measured from the files by ``training/provenance.py``.

    Counts are images; ``positives`` is per label key and split. ``manifest_sha256`` is the
    sha256 of the dataset manifest (one line per file: split, relative path, file sha256,
    labels), which stays with the data: the same folder always gives the same digest."""

    kind: DataKindValues
    description: str
    images: int = Field(ge=0)
    studies: int = Field(ge=0)
    splits: dict[str, int]
    positives: dict[str, dict[str, int]]
    label_sources: dict[str, int] = Field(default_factory=dict)
    modalities: dict[str, int] = Field(default_factory=dict)
    manufacturers: dict[str, int] = Field(default_factory=dict)
    study_dates: tuple[str, str] | None = None
    dates_note: str = ""
    deidentification: str
    manifest_sha256: Sha256


class Provenance(_Frozen):
    trained_on: str
    training_config: str
    created: str
    git_commit: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    #: PyTorch state_dict beside the artifact, for fine-tuning (never loaded by serving)
    weights_file: str = ""
    weights_sha256: str = ""
    #: measured data provenance (versions trained by ``training/``; absent on imports)
    data: TrainingData | None = None


class ModelManifest(_Frozen):
    """Valid once constructed: ids, versions, label/output agreement and codes are checked."""

    id: str
    version: str
    name: str
    task: TaskValues
    intended_use: Annotated[str, Field(min_length=20)]
    accepts: Accepts
    artifact: Artifact
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    labels: list[Label] = Field(min_length=1)
    provenance: Provenance
    ood: OodSpec | None = None

    @field_validator("id")
    @classmethod
    def _kebab(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError("id must be kebab-case, e.g. 'cxr-triage'")
        return value

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.match(value):
            raise ValueError("version must be semver MAJOR.MINOR.PATCH")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelManifest:
        keys = [label.key for label in self.labels]
        if len(set(keys)) != len(keys):
            raise ValueError("label keys must be unique")
        roles = [o.role for o in self.outputs]
        if OutputRoleValues.SCORES not in roles:
            raise ValueError("one output must have role 'scores'")
        for out in self.outputs:
            if len(out.shape) < 2 or out.shape[0] != -1:
                raise ValueError(f"output {out.name!r} must have a dynamic batch dimension")
            if out.role == OutputRoleValues.FEATURES:
                if len(out.shape) != 2 or out.shape[1] < 1 or out.activation != "none":
                    raise ValueError(f"features output {out.name!r} must be [-1, D] with activation 'none'")
                continue
            if out.shape[1] != len(self.labels):
                raise ValueError(f"output {out.name!r} has {out.shape[1]} channels for {len(self.labels)} labels")
        if self.accepts.samples_per_pixel != self.input.shape[1] and not (
            self.accepts.samples_per_pixel == 1 and self.input.shape[1] == 1
        ):
            raise ValueError("accepts.samples_per_pixel disagrees with the input channel count")
        if self.ood is not None:
            target = self.output_by_name(self.ood.features_output)
            if target is None or target.role != OutputRoleValues.FEATURES:
                raise ValueError("ood.features_output must name an output with role 'features'")
        return self

    @property
    def ref(self) -> str:
        """``id@version``: how results, logs and the registry name this model."""
        return f"{self.id}@{self.version}"

    def output(self, role: OutputRoleValues) -> OutputSpec | None:
        return next((o for o in self.outputs if o.role == role), None)

    def output_by_name(self, name: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


class LoadedManifest(_Frozen):
    """A manifest, where it came from, and the digest of the manifest text itself."""

    manifest: ModelManifest
    directory: Path
    manifest_sha256: str

    @property
    def artifact_path(self) -> Path:
        return self.directory / self.manifest.artifact.file


def parse_manifest(text: str) -> ModelManifest:
    """Parse manifest YAML text.

    Raises:
        ManifestError: YAML is invalid or the content breaks the schema (message names the field).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest is not valid YAML ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ManifestError("manifest must be a YAML mapping")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(f"manifest field {where!r}: {first['msg']}") from exc


def load_manifest(path: str | Path) -> LoadedManifest:
    """Read ``manifest.yaml`` (or a directory holding one) and validate it; no artifact check."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.yaml"
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ManifestError(f"manifest cannot be read ({type(exc).__name__})") from exc
    manifest = parse_manifest(raw.decode("utf-8"))
    return LoadedManifest(
        manifest=manifest, directory=p.parent.resolve(), manifest_sha256=hashlib.sha256(raw).hexdigest()
    )


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Stream a file through sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(loaded: LoadedManifest) -> Path:
    """Check that the artifact (and the ood stats file, when declared) exists inside the
    manifest's folder and matches its sha256.

    Returns the artifact path. Raises ``ModelIntegrityError`` otherwise; the message names the
    model, never a patient.
    """
    path = loaded.artifact_path
    resolved = path.resolve()
    if resolved.parent != loaded.directory or path.is_symlink():
        raise ModelIntegrityError(f"{loaded.manifest.ref}: artifact must be a regular file beside its manifest")
    if not resolved.is_file():
        raise ModelIntegrityError(f"{loaded.manifest.ref}: artifact {loaded.manifest.artifact.file} is missing")
    actual = file_sha256(resolved)
    if actual != loaded.manifest.artifact.sha256:
        raise ModelIntegrityError(
            f"{loaded.manifest.ref}: artifact sha256 {actual[:12]}... does not match manifest "
            f"{loaded.manifest.artifact.sha256[:12]}..."
        )
    if loaded.manifest.ood is not None:
        from models.ood import verify_ood_stats  # models.ood imports this module

        verify_ood_stats(loaded)
    return resolved
