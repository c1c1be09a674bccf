"""Import a torchxrayvision DenseNet as a dxassist model version.

The architecture comes from the ``torchxrayvision`` package (``xrv.models.DenseNet`` built with
``weights=None``: the package never downloads anything here); the weights come from a local
file the site obtained (a state dict, or the package's pickled model file, which is read with
``weights_only=True`` and refused if it needs arbitrary unpickling). Preprocessing is the
registered ``xrv_v1`` (grayscale, letterboxed to 224, scaled to [-1024, 1024]).

torchxrayvision's 18 output names are mapped to SNOMED CT codes below; a site chooses which of
them to screen (``--labels``), because a given weight set is trained on only some of them.
Thresholds start as placeholders until ``dxassist models validate`` proposes site operating
points (the package's ``op_threshs`` belong to its own test sets).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from models.errors import ManifestError, SignatureMismatch
from models.importing import ImportReport, ImportSpec, import_onnx, stage_import
from models.manifest import file_sha256
from training.import_bundle import TappedNetwork, export_for_import, site_tensors_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class XrvFinding:
    key: str
    code: str
    meaning: str
    site_code: str
    site_meaning: str
    critical: bool = False


_LUNG = ("39607008", "Lung structure")
_PLEURA = ("3120008", "Pleural membrane structure")
_HEART = ("80891009", "Heart structure")
_CHEST = ("51185008", "Thoracic structure")

#: torchxrayvision pathology name -> dxassist key and SNOMED CT finding / body site
XRV_FINDINGS: Final[dict[str, XrvFinding]] = {
    "Atelectasis": XrvFinding("atelectasis", "46621007", "Atelectasis", *_LUNG),
    "Consolidation": XrvFinding("consolidation", "95436008", "Lung consolidation", *_LUNG),
    "Infiltration": XrvFinding("infiltration", "409609008", "Radiographic infiltrate of lung", *_LUNG),
    "Pneumothorax": XrvFinding("pneumothorax", "36118008", "Pneumothorax", *_PLEURA, critical=True),
    "Edema": XrvFinding("edema", "19242006", "Pulmonary edema", *_LUNG),
    "Emphysema": XrvFinding("emphysema", "87433001", "Pulmonary emphysema", *_LUNG),
    "Fibrosis": XrvFinding("fibrosis", "51615001", "Fibrosis of lung", *_LUNG),
    "Effusion": XrvFinding("pleural_effusion", "60046008", "Pleural effusion", *_PLEURA),
    "Pneumonia": XrvFinding("pneumonia", "233604007", "Pneumonia", *_LUNG),
    "Pleural_Thickening": XrvFinding("pleural_thickening", "44608003", "Pleural thickening", *_PLEURA),
    "Cardiomegaly": XrvFinding("cardiomegaly", "8186001", "Cardiomegaly", *_HEART),
    "Nodule": XrvFinding("nodule", "427359005", "Solitary nodule of lung", *_LUNG),
    "Mass": XrvFinding("mass", "309529002", "Lung mass", *_LUNG),
    "Hernia": XrvFinding("hernia", "84089009", "Hiatal hernia", *_CHEST),
    "Lung Lesion": XrvFinding("lung_lesion", "300395003", "Lesion of lung", *_LUNG),
    "Fracture": XrvFinding("fracture", "125605004", "Fracture of bone", *_CHEST),
    "Lung Opacity": XrvFinding("lung_opacity", "263698000", "Opacity of lung", *_LUNG),
    "Enlarged Cardiomediastinum": XrvFinding(
        "enlarged_cardiomediastinum", "24484000", "Enlarged cardiomediastinum", *_CHEST
    ),
}

XRV_TAPS: Final = ("features.transition2", "features.transition3", "features.norm5")


def xrv_densenet() -> torch.nn.Module:
    """torchxrayvision's DenseNet121, randomly initialised (``weights=None``: no download)."""
    import torchxrayvision as xrv  # type: ignore[import-untyped]

    return xrv.models.DenseNet(weights=None)


def xrv_pathologies() -> list[str]:
    import torchxrayvision as xrv

    return list(xrv.datasets.default_pathologies)


def load_xrv_weights(net: torch.nn.Module, path: Path) -> str:
    """Load a local weights file into ``net``; returns its sha256.

    Raises:
        ManifestError: unreadable, needs arbitrary unpickling, or does not fit the architecture.
    """
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ManifestError(
            f"xrv weights cannot be loaded safely ({type(exc).__name__}); save the model's state_dict() instead"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ManifestError("xrv weights file must hold a state dict")
    state = {k: v for k, v in state.items() if k != "op_threshs"}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ManifestError("xrv weights do not fit torchxrayvision's DenseNet121 (missing/unexpected keys)") from exc
    return file_sha256(path)


def xrv_labels(pathologies: Sequence[str]) -> list[dict[str, Any]]:
    """Import-spec label entries for these torchxrayvision pathology names."""
    out = []
    for name in pathologies:
        finding = XRV_FINDINGS.get(name)
        if finding is None:
            raise SignatureMismatch(f"torchxrayvision output {name!r} has no SNOMED CT mapping here")
        out.append(
            {
                "key": finding.key,
                "display": finding.meaning,
                "code": {"scheme": "SCT", "value": finding.code, "meaning": finding.meaning},
                "body_site": {"scheme": "SCT", "value": finding.site_code, "meaning": finding.site_meaning},
                "critical": finding.critical,
            }
        )
    return out


def xrv_spec(
    *,
    model_id: str,
    version: str,
    pathologies: Sequence[str],
    trained_on: str,
    source: str,
    acceptance: float = 0.95,
) -> ImportSpec:
    """The import spec of a torchxrayvision DenseNet for the chosen pathologies."""
    return ImportSpec.model_validate(
        {
            "id": model_id,
            "version": version,
            "name": f"torchxrayvision DenseNet121 ({len(pathologies)} findings)",
            "intended_use": (
                "Worklist prioritisation aid for adult frontal (PA/AP) chest radiographs; flags suspected "
                "findings for earlier reading. Not a diagnosis; a radiologist reads every study."
            ),
            "accepts": {
                "modality": ["CR", "DX"],
                "body_part_examined": ["CHEST", "THORAX", ""],
                "view_position": ["PA", "AP"],
                "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
                "samples_per_pixel": 1,
                "min_side": 224,
            },
            "input": {"preprocessing": "xrv_v1", "name": "image"},
            "labels": xrv_labels(pathologies),
            "outputs": [
                {"name": "logits", "role": "scores", "activation": "sigmoid"},
                {"name": "cam", "role": "heatmap", "activation": "none"},
                {"name": "features", "role": "features", "activation": "none"},
            ],
            "trained_on": trained_on,
            "source": source,
            "ood": {"acceptance": acceptance},
        }
    )


def import_xrv(
    weights: Path | None,
    *,
    model_id: str,
    version: str,
    pathologies: Sequence[str],
    trained_on: str,
    ood_folder: Path | None,
    root: Path | None = None,
    staged_dir: Path | None = None,
    net: torch.nn.Module | None = None,
) -> ImportReport:
    """Build the architecture, load ``weights`` (or take ``net`` as is), export with the parity
    gate and import (register, or only stage when ``staged_dir`` is given)."""
    names = xrv_pathologies()
    unknown = [p for p in pathologies if p not in names]
    if unknown or not pathologies:
        raise SignatureMismatch(f"not torchxrayvision outputs: {unknown or 'none chosen'}")
    network = net if net is not None else xrv_densenet()
    notes: list[str] = []
    if weights is not None:
        sha = load_xrv_weights(network, weights)
        notes.append(f"weights {weights.name} sha256 {sha[:16]}...")
    else:
        notes.append("random initial weights (no weights file): for tests and demonstrations only")
    network.eval()
    module = TappedNetwork(
        network,
        XRV_TAPS,
        select=[names.index(p) for p in pathologies],
        stack="features",
        linear="classifier",
    )
    spec = xrv_spec(
        model_id=model_id,
        version=version,
        pathologies=pathologies,
        trained_on=trained_on,
        source=f"torchxrayvision DenseNet121 ({', '.join(pathologies)})",
    )
    with tempfile.TemporaryDirectory(prefix="dxassist-xrv-") as tmp:
        exported = export_for_import(module, spec, Path(tmp))
        notes = [*exported.notes, *notes]
        tensors = site_tensors_for(spec, ood_folder)
        if staged_dir is not None:
            return stage_import(exported.onnx_path, spec, staged_dir, ood_tensors=tensors, notes=notes)
        kwargs = {"root": root} if root is not None else {}
        return import_onnx(exported.onnx_path, spec, ood_tensors=tensors, notes=notes, **kwargs)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.import_xrv WEIGHTS --id ID --version V --labels A,B --trained-on TEXT --ood-folder DIR``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("--id", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--labels", required=True, help="comma-separated torchxrayvision pathology names")
    parser.add_argument("--trained-on", required=True)
    parser.add_argument("--ood-folder", type=Path, required=True)
    parser.add_argument("--stage", type=Path, default=None)
    args = parser.parse_args(argv)
    report = import_xrv(
        args.weights,
        model_id=args.id,
        version=args.version,
        pathologies=[p.strip() for p in args.labels.split(",") if p.strip()],
        trained_on=args.trained_on,
        ood_folder=args.ood_folder,
        staged_dir=args.stage,
    )
    print(f"{report.manifest['id']}@{report.manifest['version']}: {report.staged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
