"""``dxassist models import``: take in a model somebody else trained, as a registry version.

The input is an ONNX file and a small YAML import spec (labels with their codes, what the model
accepts, the registered preprocessing it expects, its intended use, what it was trained on).
The importer

1. inspects the graph (ONNX Runtime reads it; the opset comes from the file's own
   ``opset_import``) and *proposes* the manifest's input/output signature from it and the spec:
   input ``[-1, C, H, W]`` float32 fitting the preprocessing, a ``scores`` output with one
   channel per label, heatmap/mask outputs, a ``features`` output for the out-of-distribution
   gate; any disagreement is a ``SignatureMismatch`` naming what differs, and nothing is staged;
2. fits the version's out-of-distribution gate on a folder of the site's own unlabelled
   in-distribution studies (when the graph exports ``features``);
3. writes artifact + ``manifest.yaml`` (sha256) + ``ood.npz`` + a model card stub into a staging
   folder, opens it through ``OnnxPredictor`` (checksum, signature, self-test), and only then
   registers it (``models.registry.register_version``: never overwrites a version).

Preprocessing is only ever a *name* from ``models.preprocessing.PIPELINES``: a manifest cannot
carry code. Torch-side importers (MONAI bundles, torchxrayvision) export to ONNX in
``training/`` and then come through here, so every imported version passes the same checks.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
import onnxruntime as ort
import yaml
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.decode import DecodedInstance, RoutePlanner, prepare_instance
from models.errors import ManifestError, SignatureMismatch
from models.manifest import (
    Accepts,
    Code,
    OutputRoleValues,
    TaskValues,
    file_sha256,
    load_manifest,
    parse_manifest,
)
from models.onnx_features import FEATURES_NAME, add_features_output
from models.ood import GaussianStats, fit_gaussian, threshold_for_acceptance
from models.predictor import OnnxPredictor
from models.preprocessing import PIPELINES, get_pipeline
from models.registry import REGISTRY_ROOT, register_version

logger = logging.getLogger(__name__)

#: largest ONNX file the importer opens at all (a hostile file must not exhaust memory)
MAX_ONNX_BYTES: Final = 2 * 1024**3
#: largest import spec read
MAX_SPEC_BYTES: Final = 256 * 1024
OOD_STATS_FILE: Final = "ood.npz"
PLACEHOLDER_BASIS: Final = (
    "imported without a site operating point: placeholder until `dxassist models validate` "
    "proposes one on the site's labelled studies"
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImportLabel(_Frozen):
    """One finding of an imported model (the output channel at the same position)."""

    key: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    display: str
    code: Code
    body_site: Code
    critical: bool = False
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    threshold_basis: str | None = None


class ImportInput(_Frozen):
    preprocessing: str
    #: the graph's input name, when the spec wants to pin it (else the graph's only input)
    name: str | None = None


class ImportOutput(_Frozen):
    """Pin an output's role explicitly (otherwise proposed from its shape)."""

    name: str
    role: OutputRoleValues
    activation: Literal["sigmoid", "none"] = "sigmoid"


class ImportOod(_Frozen):
    acceptance: float = Field(default=0.95, gt=0.5, lt=1.0)
    components: int = Field(default=64, ge=1, le=1024)


class ImportSpec(_Frozen):
    """The YAML a site writes beside a third-party ONNX file."""

    id: str
    version: str
    name: str
    task: TaskValues = TaskValues.CLASSIFICATION
    intended_use: Annotated[str, Field(min_length=20)]
    accepts: Accepts
    input: ImportInput
    labels: list[ImportLabel] = Field(min_length=1)
    outputs: list[ImportOutput] = Field(default_factory=list)
    #: activation of the proposed scores output: ``sigmoid`` when the graph emits logits
    scores_activation: Literal["sigmoid", "none"] = "sigmoid"
    trained_on: Annotated[str, Field(min_length=10)]
    source: Annotated[str, Field(min_length=3)]
    ood: ImportOod = ImportOod()


def load_import_spec(path: Path) -> ImportSpec:
    """Read and validate an import spec.

    Raises:
        ManifestError: unreadable, too large, not YAML, or breaks the schema (names the field).
    """
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise ManifestError(f"import spec is larger than {MAX_SPEC_BYTES} bytes")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"import spec cannot be read ({type(exc).__name__})") from exc
    except yaml.YAMLError as exc:
        raise ManifestError(f"import spec is not valid YAML ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ManifestError("import spec must be a YAML mapping")
    try:
        return ImportSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ManifestError(f"import spec field {where!r}: {first['msg']}") from exc


# -- the graph ---------------------------------------------------------------------------------

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # ONNX Runtime's type string, e.g. ``tensor(float)``

    def describe(self) -> str:
        dims = ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


@dataclass(frozen=True)
class GraphSignature:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int

    def describe(self) -> str:
        ins = "; ".join(t.describe() for t in self.inputs)
        outs = "; ".join(t.describe() for t in self.outputs)
        return f"inputs: {ins}\noutputs: {outs}\nopset: {self.opset}"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def onnx_opset(path: Path) -> int:
    """The default-domain opset of an ONNX file, read from the top-level ``opset_import``
    fields of its ``ModelProto`` (a small protobuf walk: the runtime has no ``onnx`` package).

    Raises:
        ManifestError: the file is not a well-formed ONNX model or names no default opset.
    """
    buf = path.read_bytes()
    pos, opset = 0, 0
    try:
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(buf, pos)
                if pos + length > len(buf):
                    raise ValueError("truncated field")
                if field == 8:  # OperatorSetIdProto {1: domain, 2: version}
                    sub, end, domain, version = pos, pos + length, "", 0
                    while sub < end:
                        k, sub = _varint(buf, sub)
                        if k == (1 << 3 | 2):
                            n, sub = _varint(buf, sub)
                            domain = buf[sub : sub + n].decode("utf-8", "replace")
                            sub += n
                        elif k == (2 << 3 | 0):
                            version, sub = _varint(buf, sub)
                        else:
                            raise ValueError("unexpected opset field")
                    if domain in ("", "ai.onnx"):
                        opset = version
                pos += length
            else:
                raise ValueError("unsupported wire type")
    except (ValueError, IndexError) as exc:
        raise ManifestError(f"not a well-formed ONNX model ({exc})") from exc
    if opset <= 0:
        raise ManifestError("ONNX model names no default-domain opset")
    return opset


def inspect_onnx(path: Path) -> GraphSignature:
    """Open the graph with ONNX Runtime (CPU) and read its inputs, outputs and opset.

    Raises:
        ManifestError: missing, too large, or a file ONNX Runtime refuses.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ManifestError(f"ONNX file cannot be read ({type(exc).__name__})") from exc
    if size > MAX_ONNX_BYTES:
        raise ManifestError(f"ONNX file is larger than {MAX_ONNX_BYTES} bytes")
    opset = onnx_opset(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ManifestError(f"ONNX Runtime refused the file ({type(exc).__name__})") from exc

    def info(nodes: list[Any]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(n.name, tuple(n.shape), n.type) for n in nodes)

    return GraphSignature(info(session.get_inputs()), info(session.get_outputs()), opset)


def _fixed(d: Dim) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def propose_signature(signature: GraphSignature, spec: ImportSpec) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest's ``input`` and ``outputs`` blocks for this graph and spec.

    Raises:
        SignatureMismatch: the graph cannot be what the spec says (message names the tensor and
            the disagreement).
        ManifestError: the preprocessing name is not registered.
    """
    pipeline = get_pipeline(spec.input.preprocessing)
    n_labels = len(spec.labels)
    if len(signature.inputs) != 1:
        raise SignatureMismatch(f"the graph has {len(signature.inputs)} inputs; dxassist runs single-input models")
    graph_in = signature.inputs[0]
    if spec.input.name is not None and graph_in.name != spec.input.name:
        raise SignatureMismatch(f"input is named {graph_in.name!r}, the spec says {spec.input.name!r}")
    if graph_in.dtype != "tensor(float)":
        raise SignatureMismatch(f"input {graph_in.describe()}: must be float32")
    if len(graph_in.shape) != 4:
        raise SignatureMismatch(f"input {graph_in.describe()}: must be [batch, channels, height, width]")
    if _fixed(graph_in.shape[0]) is not None:
        raise SignatureMismatch(f"input {graph_in.describe()}: the batch dimension must be dynamic")
    channels, height, width = (_fixed(d) for d in graph_in.shape[1:])
    if channels is None:
        raise SignatureMismatch(f"input {graph_in.describe()}: the channel count must be fixed")
    if channels != pipeline.channels or channels != spec.accepts.samples_per_pixel:
        raise SignatureMismatch(
            f"input {graph_in.describe()}: {channels} channels, but preprocessing {pipeline.name!r} gives "
            f"{pipeline.channels} and the spec accepts samples_per_pixel {spec.accepts.samples_per_pixel}"
        )
    for dim in (height, width):
        if dim is not None and dim != pipeline.size:
            raise SignatureMismatch(
                f"input {graph_in.describe()}: preprocessing {pipeline.name!r} gives {pipeline.size}x{pipeline.size}"
            )
    input_block = {
        "name": graph_in.name,
        "shape": [-1, channels, pipeline.size, pipeline.size],
        "dtype": "float32",
        "value_range": list(pipeline.value_range),
        "preprocessing": pipeline.name,
    }
    by_name = {o.name: o for o in signature.outputs}
    pinned = {o.name: o for o in spec.outputs}
    for name in pinned:
        if name not in by_name:
            raise SignatureMismatch(f"the spec names output {name!r}; the graph has {sorted(by_name)}")
    outputs: list[dict[str, Any]] = []
    for out in signature.outputs:
        if out.dtype != "tensor(float)":
            if out.name in pinned:
                raise SignatureMismatch(f"output {out.describe()}: must be float32")
            continue
        if len(out.shape) < 2 or _fixed(out.shape[0]) is not None:
            raise SignatureMismatch(f"output {out.describe()}: the batch dimension must be dynamic")
        dims = [_fixed(d) for d in out.shape[1:]]
        pin = pinned.get(out.name)
        if pin is not None:
            role, activation = pin.role, pin.activation
        elif len(dims) == 1 and dims[0] == n_labels and not any(o["role"] == OutputRoleValues.SCORES for o in outputs):
            role, activation = OutputRoleValues.SCORES, spec.scores_activation
        elif len(dims) == 1 and dims[0] is not None:
            role, activation = OutputRoleValues.FEATURES, "none"
        elif len(dims) == 3 and dims[0] == n_labels:
            role = OutputRoleValues.MASK if spec.task == TaskValues.SEGMENTATION else OutputRoleValues.HEATMAP
            activation = "sigmoid" if role == OutputRoleValues.MASK else "none"
        else:
            logger.info("import: output %s left out (no role fits its shape)", out.describe())
            continue
        if role == OutputRoleValues.FEATURES:
            activation = "none"
            if len(dims) != 1 or dims[0] is None:
                raise SignatureMismatch(f"output {out.describe()}: features must be [batch, D] with D fixed")
        elif dims[0] != n_labels or any(d is None for d in dims):
            raise SignatureMismatch(
                f"output {out.describe()}: role {role.value} needs {n_labels} channels (one per label) and fixed sizes"
            )
        outputs.append(
            {
                "name": out.name,
                "shape": [-1, *[int(d) for d in dims if d is not None]],
                "dtype": "float32",
                "role": role.value,
                "activation": activation,
            }
        )
    scores = [o for o in outputs if o["role"] == OutputRoleValues.SCORES]
    if len(scores) != 1:
        raise SignatureMismatch(
            f"the graph needs exactly one scores output [batch, {n_labels}] for {n_labels} labels; found "
            f"{len(scores)} among: " + "; ".join(o.describe() for o in signature.outputs)
        )
    if sum(o["role"] == OutputRoleValues.FEATURES for o in outputs) > 1:
        raise SignatureMismatch("more than one [batch, D] output: pin the features output in the spec")
    return input_block, outputs


# -- the out-of-distribution fingerprint -------------------------------------------------------


@dataclass(frozen=True)
class OodFit:
    block: dict[str, Any]
    fitted_on: int
    held_out: int


def site_tensors(folder: Path, manifest_block: dict[str, Any], *, limit: int = 2000) -> NDArray[np.float32]:
    """Preprocessed model inputs of the DICOM files under ``folder`` that the version accepts
    (its QA and preprocessing, as in serving; one frame per image)."""
    manifest = parse_manifest(yaml.safe_dump(manifest_block, sort_keys=False))
    planner = RoutePlanner((manifest,), 1)
    tensors: list[NDArray[np.float32]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        outcome = prepare_instance(path, planner)
        if isinstance(outcome, DecodedInstance):
            tensors.append(outcome.tensors[0])
            if len(tensors) >= limit:
                break
    if not tensors:
        raise ManifestError("the OOD folder holds no study this version accepts")
    return np.stack(tensors)


def fit_ood(
    artifact: Path,
    input_name: str,
    features_output: str,
    tensors: NDArray[np.float32],
    *,
    acceptance: float,
    components: int,
    data_text: str,
    out_dir: Path,
) -> OodFit:
    """Fit the gate on 4 of every 5 site images, choose the limit on the fifth for
    ``acceptance``; write ``ood.npz`` into ``out_dir`` and return the manifest block."""
    if len(tensors) < 10:
        raise ManifestError(f"the OOD folder gave {len(tensors)} usable images; at least 10 are needed")
    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    feats = np.concatenate(
        [
            np.asarray(session.run([features_output], {input_name: tensors[i : i + 16]})[0], np.float64)
            for i in range(0, len(tensors), 16)
        ]
    )
    held = np.arange(len(feats)) % 5 == 4
    fitted = fit_gaussian(feats[~held], components=components)
    stats = GaussianStats.from_bytes(fitted.to_bytes())  # the limit is chosen on what serving loads
    d_held = stats.distances(feats[held])
    threshold = max(threshold_for_acceptance(d_held, acceptance), 1e-6)
    path = out_dir / OOD_STATS_FILE
    path.write_bytes(stats.to_bytes())
    block = {
        "method": "mahalanobis",
        "features_output": features_output,
        "stats_file": OOD_STATS_FILE,
        "stats_sha256": file_sha256(path),
        "threshold": round(float(threshold), 3),
        "acceptance_target": acceptance,
        "basis": (
            f"Mahalanobis distance of the features output to a Gaussian fitted on {data_text} "
            f"(n={int((~held).sum())}, Ledoit-Wolf shrinkage, {stats.components.shape[1]} principal directions); "
            f"limit = the distance that accepts {acceptance:.0%} of held-out site images (n={int(held.sum())})"
        ),
        "metrics": {"held_out_acceptance": round(float(np.mean(d_held <= threshold)), 4)},
    }
    return OodFit(block, int((~held).sum()), int(held.sum()))


# -- staging and registering -------------------------------------------------------------------


def manifest_from_spec(
    spec: ImportSpec,
    input_block: dict[str, Any],
    outputs: list[dict[str, Any]],
    *,
    artifact_file: str,
    sha256: str,
    opset: int,
) -> dict[str, Any]:
    labels = [
        {
            "key": lab.key,
            "display": lab.display,
            "code": lab.code.model_dump(mode="json"),
            "body_site": lab.body_site.model_dump(mode="json"),
            "critical": lab.critical,
            "threshold": lab.threshold if lab.threshold is not None else 0.5,
            "threshold_basis": lab.threshold_basis or PLACEHOLDER_BASIS,
        }
        for lab in spec.labels
    ]
    return {
        "id": spec.id,
        "version": spec.version,
        "name": spec.name,
        "task": spec.task.value,
        "intended_use": spec.intended_use,
        "accepts": spec.accepts.model_dump(mode="json"),
        "input": input_block,
        "outputs": outputs,
        "labels": labels,
        "artifact": {"file": artifact_file, "sha256": sha256, "opset": opset},
        "provenance": {
            "trained_on": spec.trained_on,
            "training_config": f"imported: {spec.source}",
            "created": dt.date.today().isoformat(),
        },
    }


def model_card_stub(manifest: dict[str, Any], signature: GraphSignature, notes: list[str]) -> str:
    """A model card to complete by hand; states what the importer knows and what it does not."""
    ood = manifest.get("ood")
    rows = "\n".join(
        f"| {lab['key']} | {lab['code']['scheme']} {lab['code']['value']} {lab['code']['meaning']} | "
        f"{lab['threshold']:.3f} | {lab['threshold_basis']} |"
        for lab in manifest["labels"]
    )
    lines = [
        f"# Model card: {manifest['id']} {manifest['version']} (imported)",
        "",
        f"**Imported from:** {manifest['provenance']['training_config'].removeprefix('imported: ')}",
        "",
        "## Intended use",
        manifest["intended_use"],
        "",
        "## Training data (as declared by the supplier)",
        manifest["provenance"]["trained_on"],
        "",
        "## Inputs",
        f"- Accepts modality {manifest['accepts']['modality']}, body part {manifest['accepts']['body_part_examined']},"
        f" view {manifest['accepts']['view_position']}.",
        f"- Preprocessing `{manifest['input']['preprocessing']}` (registered in models/preprocessing.py), "
        f"value range {manifest['input']['value_range']}.",
        "",
        "## Graph as inspected",
        "```",
        signature.describe(),
        "```",
        "",
        "## Findings and operating points",
        "| label | code | threshold | basis |",
        "|---|---|---|---|",
        rows,
        "",
        "## Out-of-distribution gate",
        ood["basis"]
        if ood
        else "None: the graph exports no features output; this version screens every accepted image.",
        "",
        "## Site validation",
        "Not yet validated at this site. Run `dxassist models validate "
        f"{manifest['id']}@{manifest['version']} --labels FILE` before go-live; thresholds change only with a new version.",
        "",
        *([*("- " + n for n in notes), ""] if notes else []),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class ImportReport:
    staged: Path
    registered: Path | None
    manifest: dict[str, Any]
    signature: GraphSignature
    ood_images: int


def stage_import(
    onnx_path: Path,
    spec: ImportSpec,
    staged_dir: Path,
    *,
    ood_folder: Path | None = None,
    ood_tensors: NDArray[np.float32] | None = None,
    notes: list[str] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> ImportReport:
    """Inspect, propose, (fit the OOD gate), write and verify a staged version folder.

    ``ood_tensors`` (already preprocessed site images) may stand in for ``ood_folder``.

    Raises:
        SignatureMismatch / ManifestError: the graph and the spec disagree; nothing is left in
            ``staged_dir``.
    """
    signature = inspect_onnx(onnx_path)
    input_block, outputs = propose_signature(signature, spec)
    notes = list(notes or [])
    staged_dir.mkdir(parents=True, exist_ok=True)
    try:
        artifact_file = f"{spec.id}-{spec.version}.onnx"
        artifact = staged_dir / artifact_file
        shutil.copyfile(onnx_path, artifact)
        has_features = any(o["role"] == OutputRoleValues.FEATURES for o in outputs)
        if not has_features and (ood_folder is not None or ood_tensors is not None):
            taps = _with_features(onnx_path, artifact, input_block["name"], [o["name"] for o in outputs])
            if taps:
                signature = inspect_onnx(artifact)
                input_block, outputs = propose_signature(signature, spec)
                notes.append(
                    f"dxassist added the output {FEATURES_NAME} (global average pools of {', '.join(taps)}) "
                    f"for the OOD gate; the supplier's outputs are unchanged (checked); supplied file sha256 "
                    f"{file_sha256(onnx_path)}."
                )
        manifest = manifest_from_spec(
            spec,
            input_block,
            outputs,
            artifact_file=artifact_file,
            sha256=file_sha256(artifact),
            opset=signature.opset,
        )
        parse_manifest(yaml.safe_dump(manifest, sort_keys=False))  # schema check before the OOD fit
        features = next((o["name"] for o in outputs if o["role"] == OutputRoleValues.FEATURES), None)
        n_ood = 0
        if features is not None and (ood_folder is not None or ood_tensors is not None):
            tensors = ood_tensors if ood_tensors is not None else site_tensors(ood_folder, manifest)  # type: ignore[arg-type]
            fit = fit_ood(
                artifact,
                input_block["name"],
                features,
                tensors,
                acceptance=spec.ood.acceptance,
                components=spec.ood.components,
                data_text="the site's own unlabelled in-distribution studies",
                out_dir=staged_dir,
            )
            manifest["ood"] = fit.block
            n_ood = fit.fitted_on + fit.held_out
        elif features is not None:
            raise ManifestError("the graph exports features: give a folder of site studies to fit the OOD gate")
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staged_dir / name)
        text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)
        parse_manifest(text)
        (staged_dir / "manifest.yaml").write_text(text)
        (staged_dir / "MODEL_CARD.md").write_text(model_card_stub(manifest, signature, notes))
        predictor = OnnxPredictor(load_manifest(staged_dir), providers="cpu", intra_op_threads=1)
        if not predictor.self_test().ok:
            raise SignatureMismatch(f"{spec.id}@{spec.version}: the graph fails its self-test (shapes or NaN)")
    except BaseException:
        shutil.rmtree(staged_dir, ignore_errors=True)
        raise
    return ImportReport(staged_dir, None, manifest, signature, n_ood)


def _with_features(src: Path, artifact: Path, input_name: str, outputs: list[str]) -> list[str] | None:
    """Replace ``artifact`` by ``src`` plus a features output when that can be done and changes
    none of the declared outputs (probe input, max difference 1e-6 relative)."""
    with tempfile.TemporaryDirectory(prefix="dxassist-features-") as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        try:
            taps = add_features_output(src, augmented)
        except Exception as exc:  # onnx's checker/shape inference on a file from outside
            logger.info("import: no features output could be added (%s)", type(exc).__name__)
            return None
        if not taps:
            return None
        original = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        extended = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in original.get_inputs()[0].shape]
        probe = np.random.default_rng(0).random(shape, dtype=np.float32)
        for a, b in zip(
            original.run(outputs, {input_name: probe}), extended.run(outputs, {input_name: probe}), strict=True
        ):
            if not np.allclose(a, b, rtol=1e-6, atol=1e-6):
                raise SignatureMismatch("adding the features output changed the graph's own outputs")
        shutil.copyfile(augmented, artifact)
        return taps


def import_onnx(
    onnx_path: Path,
    spec: ImportSpec,
    *,
    root: Path = REGISTRY_ROOT,
    ood_folder: Path | None = None,
    ood_tensors: NDArray[np.float32] | None = None,
    notes: list[str] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> ImportReport:
    """Stage in a temporary folder, then register beside the existing versions.

    Raises:
        SignatureMismatch / ManifestError / VersionExists.
    """
    with tempfile.TemporaryDirectory(prefix="dxassist-import-") as tmp:
        report = stage_import(
            onnx_path,
            spec,
            Path(tmp) / "staged",
            ood_folder=ood_folder,
            ood_tensors=ood_tensors,
            notes=notes,
            extra_files=extra_files,
        )
        target = register_version(report.staged, root)
    return ImportReport(target, target, report.manifest, report.signature, report.ood_images)


def known_preprocessing() -> list[str]:
    return sorted(PIPELINES)


def derive_version(
    model_id: str,
    from_version: str,
    new_version: str,
    thresholds: dict[str, tuple[float, str]],
    *,
    root: Path = REGISTRY_ROOT,
    report_files: dict[str, Path] | None = None,
    note: str = "",
) -> Path:
    """Register ``model_id@new_version``: the artifact (and OOD stats, weights) of
    ``from_version`` with new operating points (``key -> (threshold, basis)``).

    Thresholds change only with a version: the validation report that proposed them is kept
    beside the new manifest (``report_files``), and the model card gains a section naming the
    version it came from. Raises ``VersionExists`` / ``ManifestError``.
    """
    source = load_manifest(root / model_id / from_version)
    manifest = source.manifest.model_dump(mode="json", exclude_none=True)
    keys = {lab["key"] for lab in manifest["labels"]}
    unknown = sorted(set(thresholds) - keys)
    if unknown:
        raise ManifestError(f"{model_id}@{from_version} has no label(s) {unknown}")
    manifest["version"] = new_version
    manifest["labels"] = [
        {**lab, "threshold": round(thresholds[lab["key"]][0], 6), "threshold_basis": thresholds[lab["key"]][1]}
        if lab["key"] in thresholds
        else lab
        for lab in manifest["labels"]
    ]
    with tempfile.TemporaryDirectory(prefix="dxassist-derive-") as tmp:
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for item in source.directory.iterdir():
            if item.is_file() and item.name not in ("manifest.yaml",):
                shutil.copyfile(item, staged / item.name)
        for name, path in (report_files or {}).items():
            shutil.copyfile(path, staged / name)
        text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)
        parse_manifest(text)
        (staged / "manifest.yaml").write_text(text)
        card = (staged / "MODEL_CARD.md").read_text() if (staged / "MODEL_CARD.md").is_file() else ""
        rows = "\n".join(f"| {k} | {t:.4f} | {b} |" for k, (t, b) in sorted(thresholds.items()))
        card += (
            f"\n\n## Site operating points ({new_version}, from {from_version})\n\n"
            f"{note}\n\n| label | threshold | basis |\n|---|---|---|\n{rows}\n"
            f"\nReport kept beside this manifest: {', '.join(sorted(report_files or {})) or 'none'}.\n"
        )
        (staged / "MODEL_CARD.md").write_text(card)
        return register_version(staged, root)
