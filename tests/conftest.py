"""Shared fixtures: a tiny ONNX model with its manifest, synthetic DICOM studies, real radiographs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from models.synthetic.cxr import render_cxr
from models.synthetic.dicom_writer import DicomSpec, write_image
from tests.own_process import pytest_pyfunc_call, pytest_terminal_summary  # noqa: F401  (own_process hooks)

if TYPE_CHECKING:
    from models.predictor import OnnxPredictor

CANARY_NAME = "ZZCANARY^PHI"
CANARY_ID = "CANARY-123"
CANARY_ACCESSION = "CANACC987"


def build_tiny_onnx(
    path: Path, *, channels: int = 1, size: int = 32, labels: int = 2, input_name: str = "image"
) -> Path:
    """(N, C, S, S) -> mean over pixels -> linear -> logits (N, labels). Deterministic weights."""
    weights = numpy_helper.from_array(
        np.linspace(-2.0, 2.0, channels * labels, dtype=np.float32).reshape(channels, labels), "W"
    )
    bias = numpy_helper.from_array(np.linspace(-0.5, 0.5, labels, dtype=np.float32), "B")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", [input_name, "axes"], ["pooled4"], keepdims=0),
        helper.make_node("MatMul", ["pooled4", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])],
        initializer=[weights, bias, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_manifest_dict(sha256: str, *, labels: int = 2, size: int = 32, file: str = "tiny.onnx") -> dict[str, Any]:
    keys = ["alpha", "beta", "gamma", "delta"][:labels]
    return {
        "id": "tiny-test",
        "version": "0.1.0",
        "name": "tiny test model",
        "task": "classification",
        "intended_use": "unit tests of the manifest and predictor only",
        "accepts": {
            "modality": ["CR", "DX"],
            "body_part_examined": ["CHEST"],
            "view_position": ["PA", "AP"],
            "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
            "samples_per_pixel": 1,
            "min_side": 64,
        },
        "artifact": {"file": file, "sha256": sha256, "opset": 18},
        "input": {
            "name": "image",
            "shape": [-1, 1, size, size],
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "preprocessing": "cxr_v1",
        },
        "outputs": [
            {"name": "logits", "shape": [-1, labels], "dtype": "float32", "role": "scores", "activation": "sigmoid"}
        ],
        "labels": [
            {
                "key": k,
                "display": k.title(),
                "code": {"scheme": "SCT", "value": "123456", "meaning": k},
                "body_site": {"scheme": "SCT", "value": "39607008", "meaning": "Lung structure"},
                "threshold": 0.5,
                "threshold_basis": "fixed for unit tests",
            }
            for k in keys
        ],
        "provenance": {"trained_on": "nothing (hand-set weights)", "training_config": "none", "created": "2026-11-23"},
    }


@pytest.fixture(scope="session")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> OnnxPredictor:
    """A tiny 224-input model (mean pixel -> two labels): fast, deterministic service tests."""
    from models.manifest import load_manifest
    from models.predictor import OnnxPredictor

    d = tmp_path_factory.mktemp("tiny224")
    onnx_path = build_tiny_onnx(d / "tiny.onnx", size=224)
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (d / "manifest.yaml").write_text(yaml.safe_dump(tiny_manifest_dict(sha, size=224), sort_keys=False))
    return OnnxPredictor(load_manifest(d), providers="cpu")


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A folder with tiny.onnx and a matching manifest.yaml."""
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(tiny_manifest_dict(sha), sort_keys=False))
    return tmp_path


def orthanc_settings_file(
    tmp_path: Path, orthanc: Any, *, store: dict[str, Any] | None = None, **sections: Any
) -> Path:
    """A test settings file: cxr-triage on CPU over the running Orthanc's DICOMweb (``store``:
    more store keys), results in SQLite under ``tmp_path``, plus any other ``sections``."""
    path = tmp_path / "settings.yaml"
    dicomweb = {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password}
    path.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "store": {"kind": "dicomweb", "dicomweb": dicomweb, **(store or {})},
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
                **sections,
            }
        )
    )
    return path


def write_synthetic_cxr(
    path: Path,
    *,
    seed: int = 5,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    rescale: bool = False,
    window: bool = True,
    encoding: str = "explicit",
    view: str = "PA",
    body_part: str = "CHEST",
    modality: str = "CR",
    findings: dict[str, bool] | None = None,
    size: tuple[int, int] = (512, 512),
    patient_name: str | None = None,
) -> Path:
    """One deterministic synthetic chest radiograph."""
    rng = np.random.default_rng(seed)
    want = dict.fromkeys(("cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"), False)
    want.update(findings or {})
    image, _ = render_cxr(rng, size, want)
    spec = DicomSpec(modality, body_part, view, photometric, bits, rescale, window, seed, seed, "TEST")
    ds = write_image(path, image, spec, rng, encoding=encoding)
    if patient_name:
        import pydicom

        ds = pydicom.dcmread(path)
        ds.PatientName = patient_name
        ds.PatientID = CANARY_ID
        ds.AccessionNumber = CANARY_ACCESSION
        ds.save_as(path)
    return path


@pytest.fixture
def rg1() -> dict[str, Path]:
    """The real NEMA chest CR in its four encodings (pydicom-data)."""
    from pydicom.data import get_testdata_file

    out = {}
    for name in ("RG1_UNCR", "RG1_UNCI", "RG1_J2KR", "RG1_J2KI", "RG3_UNCR", "RG3_J2KI"):
        path = get_testdata_file(f"{name}.dcm")
        assert path, f"pydicom-data must provide {name}"
        out[name] = Path(str(path))
    return out


CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def relabel_as_chest(name: str, out: Path, *, sop_class: bool = False) -> Path:
    """A pydicom test file relabelled CR / CHEST / PA (and, optionally, as CR storage too)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(str(get_testdata_file(f"{name}.dcm")))
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    if sop_class:
        ds.SOPClassUID = CR_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    path = out / f"{name}_as_chest.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
