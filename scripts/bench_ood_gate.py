"""What the content gate costs: in-process per-study latency with and without it, same run.

    python scripts/bench_ood_gate.py [--studies 40] [--rounds 3]

Baseline: ``cxr-triage@1.0.0`` (same weights, no features output, no out-of-distribution
gate) with the content check switched off. Gated: the latest ``cxr-triage`` with the content check
(header facts + frame statistics), the extra ``features`` output and the Mahalanobis distance.
Both screen the same synthetic 1024 px CR studies one at a time, decode in-process, and
alternate study by study (ABBA order) so that machine load and file caches hit both alike;
medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.decode as decode
from models.content import content_checked, route_checked
from models.decode_pool import InlineDecoder
from models.predictor import OnnxPredictor
from models.qa import route
from models.registry import resolve
from models.synthetic.cxr import generate_cxr_dataset
from serving.core.screening import StudyScreener, screen_paths


def _ungated_route(header, manifests, body_part_aliases=None):  # type: ignore[no-untyped-def]
    return route(header, list(manifests), body_part_aliases=body_part_aliases)


def _unchecked(manifest, pipeline):  # type: ignore[no-untyped-def]
    return pipeline


def components(base: StudyScreener, gated: StudyScreener, files: list[Path]) -> dict[str, float]:
    """Each part of the gate timed on its own (medians over ``files`` x 10 repeats)."""
    import numpy as np

    from models.content import check_pixels
    from models.pixels import load_frames
    from models.preprocessing import get_pipeline

    p0, p1 = base.predictors["cxr-triage"], gated.predictors["cxr-triage"]
    pipeline = get_pipeline(p1.manifest.input.preprocessing)
    out: dict[str, list[float]] = {"content check": [], "distance": []}
    plain_t: list[float] = []
    gated_t: list[float] = []
    for i, path in enumerate(files):
        frame = load_frames(path, frame_indices=[0], target_size=pipeline.decode_size)[0]
        tensor = pipeline(frame)[np.newaxis]
        for j in range(10):
            start = time.perf_counter()
            check_pixels(p1.manifest, [frame])
            out["content check"].append(time.perf_counter() - start)
            for predictor, sink in [(p0, plain_t), (p1, gated_t)][:: 1 if (i + j) % 2 == 0 else -1]:
                start = time.perf_counter()
                outputs = predictor.predict(tensor)
                sink.append(time.perf_counter() - start)
                if predictor is p1:
                    gated_out = outputs
            start = time.perf_counter()
            p1.ood_distances(gated_out)
            out["distance"].append(time.perf_counter() - start)
    parts = {k: statistics.median(v) for k, v in out.items()}
    # the extra graph outputs: difference of the medians of interleaved ORT runs
    parts["features output"] = max(0.0, statistics.median(gated_t) - statistics.median(plain_t))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default="cxr-triage@1.0.0")
    parser.add_argument("--gated", default="cxr-triage@latest")
    args = parser.parse_args()

    def screener(ref: str) -> StudyScreener:
        model_id, _, version = ref.partition("@")
        predictor = OnnxPredictor(resolve(model_id, version), providers="cpu", allow_spinning=False)
        return StudyScreener([predictor], study_ref_key=b"bench", decoder=InlineDecoder())

    base, gated = screener(args.baseline), screener(args.gated)
    assert base.predictors["cxr-triage"].ood is None and gated.predictors["cxr-triage"].ood is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate_cxr_dataset(folder, args.studies, 4711, size=(1024, 1024))
        files = sorted(folder.glob("*.dcm"))
        for s in (base, gated):  # warm-up: sessions, caches
            screen_paths(s, files[:2], group_by_study=False)
        times: dict[str, list[float]] = {"baseline": [], "gated": []}
        refused = 0
        for _ in range(args.rounds):
            for i, path in enumerate(files):
                pair = [("baseline", base), ("gated", gated)]
                for name, s in pair if i % 2 == 0 else pair[::-1]:  # ABBA: neither always reads first
                    # the decode boundary looks these up at call time: switch the content check
                    ungated = name == "baseline"
                    setattr(decode, "route_checked", _ungated_route if ungated else route_checked)  # noqa: B010
                    setattr(decode, "content_checked", _unchecked if ungated else content_checked)  # noqa: B010
                    start = time.perf_counter()
                    result = screen_paths(s, [path])[0]
                    times[name].append(time.perf_counter() - start)
                    if name == "gated" and result.outcome.value != "SCREENED":
                        refused += 1
        parts = components(base, gated, files[: min(10, len(files))])
    b, g = statistics.median(times["baseline"]), statistics.median(times["gated"])
    paired = statistics.median(gt - bt for gt, bt in zip(times["gated"], times["baseline"], strict=True))
    n = len(times["gated"])
    print(f"studies: {args.studies} synthetic 1024 px CR x {args.rounds} rounds, alternating, in-process decode")
    print(f"baseline ({args.baseline}, no content check, no gate): p50 {b * 1000:.1f} ms per study")
    print(f"gated    ({args.gated}, content check + features + distance): p50 {g * 1000:.1f} ms per study")
    print(f"difference of the medians: {(g - b) * 1000:+.1f} ms = {(g / b - 1) * 100:+.1f}%")
    print(
        f"gate's added latency (median of the paired per-study differences): {paired * 1000:+.1f} ms = "
        f"{paired / b * 100:+.1f}% (goal < +10%)"
    )
    print(
        "its parts timed alone (medians; the ORT difference is noisy on a shared CPU): "
        + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in parts.items())
    )
    print(f"in-distribution studies refused by the gate during the run: {refused} of {n}")


if __name__ == "__main__":
    main()
