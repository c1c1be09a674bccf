"""Import a MONAI Bundle as a dxassist model version: network + weights -> ONNX (parity-gated)
-> ``models.importing`` (signature proposal, OOD gate on site studies, manifest, card, register).

A bundle is a folder with ``configs/metadata.json`` (``network_data_format``: input channels and
spatial shape, output channels), ``configs/inference.json`` (``network_def``) and weights in
``models/`` (``model.pt``: a state dict, or ``model.ts``: TorchScript, whose weights are loaded
into the network built from ``network_def`` after both are shown to agree, so the exported graph
always comes from known code). The site adds the small
import spec YAML (labels with SNOMED CT codes, what the model accepts, preprocessing, intended
use): a bundle's metadata carries none of those.

The network definition is instantiated by *name* from ``monai.networks.nets`` with plain JSON
arguments only: MONAI's config language evaluates ``$`` expressions as Python, which a file from
outside must never get to do, so any ``$``/``@``/``%`` reference or nested ``_target_`` is
refused. State dicts load with ``weights_only=True``.

The exported graph has three outputs: ``logits`` (one per label), optionally ``cam`` for
networks with a DenseNet-style linear head, and ``features`` (pooled statistics of named
intermediate layers) for the out-of-distribution gate.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from models.errors import ManifestError, ParityError, SignatureMismatch
from models.importing import ImportReport, ImportSpec, import_onnx, load_import_spec, site_tensors, stage_import
from models.manifest import file_sha256
from models.preprocessing import get_pipeline
from training.export_onnx import export_onnx
from training.networks import pooled_statistics

logger = logging.getLogger(__name__)

#: the parity gate of an import, per output: max |PyTorch - ONNX Runtime| <= PARITY_TOL x
#: max(1, max |PyTorch|). Scale-aware because float32 cannot do better on large activations
#: (torchxrayvision's [-1024, 1024] inputs give CAM values in the hundreds); scores, i.e. logits
#: of order 1 and their probabilities, are held to it in absolute terms.
PARITY_TOL = 1e-4
MAX_METADATA_BYTES = 1024 * 1024


class TappedNetwork(nn.Module):
    """``net`` -> (logits[, cam], features): the network's own output channels (optionally a
    subset), and pooled statistics of the ``taps`` layers for the out-of-distribution gate.

    Two ways to tap: a DenseNet-style network (a ``features`` stack followed by ``relu -> global
    mean -> Linear``) is walked stage by stage and gives class
    activation maps from the same weights (``cam.mean((2, 3)) == logits``); any other eager
    network is run whole with forward hooks on the named layers.
    """

    def __init__(
        self,
        net: nn.Module,
        taps: Sequence[str],
        *,
        select: Sequence[int] | None = None,
        stack: str | None = None,
        linear: str | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        modules = dict(net.named_modules())
        missing = [t for t in taps if t not in modules]
        if missing or not taps:
            raise SignatureMismatch(f"feature layers {missing or list(taps)} are not in the network")
        self.taps = list(taps)
        self._captured: list[torch.Tensor] = []
        head = modules.get(linear) if linear else None
        self.stack = modules.get(stack) if stack else None
        self.linear = head if self.stack is not None and hasattr(head, "weight") else None
        if self.linear is None:
            for name in self.taps:
                modules[name].register_forward_hook(self._capture)
        self.select = list(select) if select is not None else None

    def _capture(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        self._captured.append(output)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cam: torch.Tensor | None = None
        if self.stack is not None and self.linear is not None:
            prefix = next(n for n, m in self.net.named_modules() if m is self.stack)
            taps = []
            x = image
            for name, stage in self.stack.named_children():
                x = stage(x)
                if f"{prefix}.{name}" in self.taps:
                    taps.append(x)
            fmap = torch.relu(x)
            cam = torch.einsum("bchw,kc->bkhw", fmap, self.linear.weight) + self.linear.bias[None, :, None, None]
            logits = cam.mean(dim=(2, 3))
        else:
            self._captured = []
            out = self.net(image)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            taps, self._captured = self._captured, []
        features = pooled_statistics([torch.relu(t) for t in taps if t.dim() == 4])
        if self.select is not None:
            index = torch.tensor(self.select, dtype=torch.long)
            logits = logits.index_select(1, index)
            if cam is not None:
                cam = cam.index_select(1, index)
        return (logits, cam, features) if cam is not None else (logits, features)


def golden_inputs(preprocessing: str, n: int = 4, seed: int = 0) -> NDArray[np.float32]:
    """Smooth images plus noise across the pipeline's value range (parity inputs)."""
    pipeline = get_pipeline(preprocessing)
    lo, hi = pipeline.value_range
    rng = np.random.default_rng(seed)
    size = pipeline.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for i in range(n):
        base = 0.5 + 0.3 * np.sin(xx * (3 + i)) * np.cos(yy * (2 + i)) + 0.05 * rng.standard_normal((size, size))
        unit = np.clip(base, 0, 1).astype(np.float32)
        images.append(np.broadcast_to(lo + (hi - lo) * unit, (pipeline.channels, size, size)))
    return np.ascontiguousarray(np.stack(images), dtype=np.float32)


@dataclass(frozen=True)
class ExportedImport:
    onnx_path: Path
    parity: float
    notes: list[str]


def export_for_import(
    module: TappedNetwork, spec: ImportSpec, out_dir: Path, *, parity_inputs: NDArray[np.float32] | None = None
) -> ExportedImport:
    """Export ``module`` to ONNX and prove parity (``ParityError`` beyond ``PARITY_ATOL``)."""
    pipeline = get_pipeline(spec.input.preprocessing)
    inputs = parity_inputs if parity_inputs is not None else golden_inputs(pipeline.name)
    module = module.eval()
    with torch.no_grad():
        n_out = len(module(torch.from_numpy(inputs[:1])))
    names = ["logits", "cam", "features"] if n_out == 3 else ["logits", "features"]
    path = export_onnx(
        module,
        torch.from_numpy(inputs[:1]),
        out_dir / "export.onnx",
        input_name="image",
        output_names=names,
    )
    parity = scaled_parity(module, path, inputs, names)
    worst = max(parity.values())
    detail = ", ".join(f"{k} {v:.1e}" for k, v in parity.items())
    notes = [
        f"ONNX export parity on {len(inputs)} inputs, max |PyTorch - ONNX Runtime| / max(1, max |PyTorch|) "
        f"per output: {detail} (gate {PARITY_TOL:g})."
    ]
    logger.info("import: parity %s", detail)
    return ExportedImport(path, worst, notes)


def scaled_parity(
    module: nn.Module, onnx_path: Path, inputs: NDArray[np.float32], names: Sequence[str]
) -> dict[str, float]:
    """Per output: max |PyTorch - ONNX Runtime| / max(1, max |PyTorch|), plus ``probabilities``
    (sigmoid of the scores, absolute).

    Raises:
        ParityError: any of them above ``PARITY_TOL``; nothing is staged.
    """
    import onnxruntime as ort

    with torch.no_grad():
        expected = [t.numpy() for t in module(torch.from_numpy(inputs))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(names), {"image": inputs})
    out: dict[str, float] = {}
    for name, e, g in zip(names, expected, got, strict=True):
        out[name] = float(np.abs(e - g).max() / max(1.0, float(np.abs(e).max())))
    sig_e = 1 / (1 + np.exp(-np.clip(expected[0], -60, 60)))
    sig_g = 1 / (1 + np.exp(-np.clip(got[0], -60, 60)))
    out["probabilities"] = float(np.abs(sig_e - sig_g).max())
    bad = {k: v for k, v in out.items() if not v <= PARITY_TOL}
    if bad:
        raise ParityError(f"exported ONNX differs from PyTorch beyond {PARITY_TOL:g}: {bad}")
    return out


# -- MONAI bundle ------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Refuse MONAI config expressions/references: only plain JSON values may reach a constructor."""
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ManifestError(f"bundle {where}: expressions and references are not accepted")
    if isinstance(value, dict):
        if "_target_" in value:
            raise ManifestError(f"bundle {where}: nested _target_ is not accepted")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{where}[]") for v in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise ManifestError(f"bundle {path.name} is larger than {MAX_METADATA_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"bundle {path.name} cannot be read ({type(exc).__name__})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"bundle {path.name} must be a JSON object")
    return data


@dataclass(frozen=True)
class Bundle:
    network: nn.Module
    metadata: dict[str, Any]
    weights_file: Path
    weights_sha256: str
    in_channels: int
    spatial_shape: tuple[int, ...]
    out_channels: int


def load_bundle(folder: Path) -> Bundle:
    """Network (by name from ``monai.networks.nets``) and weights of a MONAI Bundle folder."""
    import monai.networks.nets as nets

    metadata = _read_json(folder / "configs" / "metadata.json")
    inference = _read_json(folder / "configs" / "inference.json")
    try:
        fmt = metadata["network_data_format"]
        image = next(iter(fmt["inputs"].values()))
        pred = next(iter(fmt["outputs"].values()))
        in_channels = int(image["num_channels"])
        spatial = tuple(int(s) for s in image["spatial_shape"])
        out_channels = int(pred["num_channels"])
    except (KeyError, TypeError, ValueError, StopIteration) as exc:
        raise ManifestError("bundle metadata.json lacks network_data_format inputs/outputs") from exc
    weights_ts = folder / "models" / "model.ts"
    weights_pt = folder / "models" / "model.pt"
    definition = inference.get("network_def")
    if not isinstance(definition, dict) or not isinstance(definition.get("_target_"), str):
        raise ManifestError("bundle inference.json has no network_def with a _target_")
    target = definition["_target_"].removeprefix("monai.networks.nets.")
    cls = getattr(nets, target, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ManifestError(f"bundle network {target!r} is not a network of monai.networks.nets")
    kwargs = _plain({k: v for k, v in definition.items() if k != "_target_"}, "network_def")
    try:
        network: nn.Module = cls(**kwargs)
    except TypeError as exc:
        raise ManifestError(f"bundle network_def arguments do not fit {target} ({exc})") from exc
    scripted: nn.Module | None = None
    if weights_pt.is_file():
        weights = weights_pt
        try:
            state = torch.load(weights_pt, map_location="cpu", weights_only=True)
        except Exception as exc:  # needs arbitrary unpickling, or not a torch file
            raise ManifestError(f"bundle weights cannot be loaded safely ({type(exc).__name__})") from exc
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    elif weights_ts.is_file():
        # TorchScript: its weights go into the eager network (the graph is then exported from
        # code we know), and the TorchScript module itself must agree with it (checked below)
        weights = weights_ts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated; bundles still ship TorchScript
            try:
                scripted = torch.jit.load(str(weights_ts), map_location="cpu").eval()
            except Exception as exc:  # a corrupt or foreign archive
                raise ManifestError(f"bundle TorchScript cannot be loaded ({type(exc).__name__})") from exc
        state = scripted.state_dict()
    else:
        raise ManifestError("bundle has no models/model.pt or models/model.ts")
    try:
        network.load_state_dict(state)
    except Exception as exc:  # missing/unexpected keys, shape mismatch, not a mapping
        raise ManifestError(f"bundle weights do not fit {target} ({type(exc).__name__})") from exc
    network.eval()
    if scripted is not None:
        probe = torch.from_numpy(np.random.default_rng(0).random((1, in_channels, *spatial), dtype=np.float32))
        with torch.no_grad():
            a, b = network(probe), scripted(probe)
        if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
            raise ParityError("bundle TorchScript and its network_def with the same weights disagree")
    return Bundle(network.eval(), metadata, weights, file_sha256(weights), in_channels, spatial, out_channels)


def _default_taps(network: nn.Module) -> tuple[list[str], str | None, str | None]:
    """Feature layers (and a CAM head) for known architectures: DenseNets' transitions and final
    norm; otherwise the last three 4-D-producing children of ``features``/the network."""
    names = {n for n, _ in network.named_modules()}
    if {"features.transition2", "features.transition3", "features.norm5"} <= names:
        linear = "class_layers.out" if "class_layers.out" in names else "classifier" if "classifier" in names else None
        return ["features.transition2", "features.transition3", "features.norm5"], "features", linear
    children = [n for n, m in network.named_children() if not isinstance(m, (nn.Linear, nn.Flatten, nn.Dropout))]
    return children[-3:], None, None


def import_bundle(
    folder: Path,
    spec: ImportSpec,
    *,
    ood_folder: Path | None,
    root: Path | None = None,
    staged_dir: Path | None = None,
    taps: Sequence[str] | None = None,
) -> ImportReport:
    """Export a bundle to ONNX (parity-gated) and import it (register, or only stage when
    ``staged_dir`` is given)."""
    bundle = load_bundle(folder)
    pipeline = get_pipeline(spec.input.preprocessing)
    if bundle.out_channels != len(spec.labels):
        raise SignatureMismatch(
            f"bundle outputs {bundle.out_channels} channels; the import spec names {len(spec.labels)} labels"
        )
    if bundle.in_channels != pipeline.channels or any(s not in (-1, pipeline.size) for s in bundle.spatial_shape):
        raise SignatureMismatch(
            f"bundle input {bundle.in_channels}x{list(bundle.spatial_shape)} does not fit preprocessing "
            f"{pipeline.name!r} ({pipeline.channels}x{pipeline.size}x{pipeline.size})"
        )
    default_taps, stack, linear = _default_taps(bundle.network)
    module = TappedNetwork(bundle.network, taps or default_taps, stack=stack, linear=linear)
    name = bundle.metadata.get("name") or folder.name
    version = bundle.metadata.get("version", "?")
    with tempfile.TemporaryDirectory(prefix="dxassist-bundle-") as tmp:
        exported = export_for_import(module, spec, Path(tmp))
        notes = [
            *exported.notes,
            f"MONAI Bundle {str(name)[:80]!r} version {str(version)[:20]}; weights {bundle.weights_file.name} "
            f"sha256 {bundle.weights_sha256[:16]}...",
        ]
        tensors = site_tensors_for(spec, ood_folder)
        if staged_dir is not None:
            return stage_import(exported.onnx_path, spec, staged_dir, ood_tensors=tensors, notes=notes)
        kwargs = {"root": root} if root is not None else {}
        return import_onnx(exported.onnx_path, spec, ood_tensors=tensors, notes=notes, **kwargs)  # type: ignore[arg-type]


def site_tensors_for(spec: ImportSpec, ood_folder: Path | None) -> NDArray[np.float32] | None:
    """Preprocessed site images for the OOD fit (QA and preprocessing of the spec)."""
    if ood_folder is None:
        return None
    block = {
        "id": spec.id,
        "version": spec.version,
        "name": spec.name,
        "task": spec.task.value,
        "intended_use": spec.intended_use,
        "accepts": spec.accepts.model_dump(mode="json"),
        "input": {
            "name": "image",
            "shape": [-1, get_pipeline(spec.input.preprocessing).channels, 8, 8],
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "preprocessing": spec.input.preprocessing,
        },
        "outputs": [{"name": "s", "shape": [-1, len(spec.labels)], "dtype": "float32", "role": "scores"}],
        "labels": [
            {**lab.model_dump(mode="json"), "threshold": 0.5, "threshold_basis": "for the QA route only"}
            for lab in spec.labels
        ],
        "artifact": {"file": "x.onnx", "sha256": "0" * 64, "opset": 17},
        "provenance": {"trained_on": "-", "training_config": "-", "created": "-"},
    }
    return site_tensors(ood_folder, block)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.import_bundle BUNDLE SPEC.yaml --ood-folder DIR [--stage DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--ood-folder", type=Path, required=True)
    parser.add_argument("--stage", type=Path, default=None, help="only stage into this folder")
    args = parser.parse_args(argv)
    report = import_bundle(args.bundle, load_import_spec(args.spec), ood_folder=args.ood_folder, staged_dir=args.stage)
    print(f"{report.manifest['id']}@{report.manifest['version']}: {report.staged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
