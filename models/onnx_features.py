"""Give an imported ONNX graph a ``features`` output, so that its version gets an
out-of-distribution gate even when the supplier exported only scores.

The graph's own outputs are left as they are; what is added reads existing tensors only: the
last tensor of each of the graph's deepest spatial stages (shape inference names them),
globally average-pooled and concatenated into ``[batch, D]``. The importer checks that the
augmented graph gives the original outputs unchanged before it is staged.

Needs the ``onnx`` package (the ``train`` extra); without it, or when no stage can be found,
``add_features_output`` returns ``None`` and the version is imported without a gate (its card
says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

FEATURES_NAME: Final = "dxassist_features"


def add_features_output(src: Path, dst: Path, *, stages: int = 3) -> list[str] | None:
    """Write ``src`` plus a ``dxassist_features`` output to ``dst``; returns the tapped tensor
    names, or ``None`` when ``onnx`` is missing or no 4-D float tensor with known channels exists."""
    try:
        import onnx
        from onnx import helper, shape_inference
    except ImportError:
        return None
    model = onnx.load(str(src))
    inferred = shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type for vi in inferred.graph.value_info}
    taken = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    if FEATURES_NAME in taken:
        return None
    last_of_stage: dict[tuple[int, int], tuple[int, str, int]] = {}
    position = 0
    for node in model.graph.node:
        for name in node.output:
            position += 1
            tensor = types.get(name)
            if tensor is None or tensor.elem_type != onnx.TensorProto.FLOAT or len(tensor.shape.dim) != 4:
                continue
            dims = tensor.shape.dim
            channels = dims[1].dim_value
            if channels <= 0:
                continue
            last_of_stage[(dims[2].dim_value, dims[3].dim_value)] = (position, name, channels)
    if not last_of_stage:
        return None
    chosen = sorted(last_of_stage.values())[-stages:]
    nodes = []
    pooled = []
    for i, (_, name, _) in enumerate(chosen):
        nodes.append(helper.make_node("GlobalAveragePool", [name], [f"dxassist_gap{i}"]))
        nodes.append(helper.make_node("Flatten", [f"dxassist_gap{i}"], [f"dxassist_flat{i}"], axis=1))
        pooled.append(f"dxassist_flat{i}")
    nodes.append(helper.make_node("Concat", pooled, [FEATURES_NAME], axis=1))
    model.graph.node.extend(nodes)
    width = sum(channels for _, _, channels in chosen)
    model.graph.output.append(helper.make_tensor_value_info(FEATURES_NAME, onnx.TensorProto.FLOAT, ["batch", width]))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return [name for _, name, _ in chosen]
