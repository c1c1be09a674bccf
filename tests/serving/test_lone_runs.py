"""A run that has the machine to itself takes the lone-run session (every core, threads spinning
while it runs); concurrent runs keep the main session (ADR 0011). Real ONNX Runtime sessions of
the tiny test model; the service test drives the real API and service."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from numpy.typing import NDArray

from models.predictor import _LONE_RUN, RUN_ALONE, OnnxPredictor, _session_options
from serving.core.screening import ModelOutputs
from serving.settings import ModelSettings
from tests.serving import test_api
from tests.serving.test_api import GatedPipeline, running, wait_for

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a lone-run session needs two cores")


def spied(predictor: OnnxPredictor) -> list[str]:
    """Which session each run used, in order."""
    used: list[str] = []
    for name, session in (("main", predictor.session), ("lone", predictor._lone)):
        assert session is not None
        real = session.run

        def run(*args: object, _real=real, _name=name, **kwargs: object) -> object:  # type: ignore[no-untyped-def]
            used.append(_name)
            return _real(*args, **kwargs)

        session.run = run
    return used


def test_a_run_marked_alone_takes_the_lone_session_once_at_a_time_and_answers_the_same(
    predictor: OnnxPredictor,
) -> None:
    p = OnnxPredictor(predictor.loaded, providers="cpu", allow_spinning=False, lone_run_session=True)
    assert OnnxPredictor(predictor.loaded, providers="cpu")._lone is None  # off unless asked
    used = spied(p)
    batch = np.random.default_rng(1).random((1, *p.input_shape), dtype=np.float32)
    main = p.predict(batch)
    RUN_ALONE.set(True)
    try:
        lone = p.predict(batch)
        with _LONE_RUN:  # another lone run under way: this one shares the cores, main session
            shared = p.predict(batch)
    finally:
        RUN_ALONE.set(False)
    assert used == ["main", "lone", "main"]
    for name in main:
        np.testing.assert_array_equal(main[name], lone[name])
        np.testing.assert_array_equal(main[name], shared[name])


def entry(options: object, key: str) -> str | None:
    """A session configuration entry ONNX Runtime was given (None: not given)."""
    try:
        return str(options.get_session_config_entry(key))  # type: ignore[attr-defined]
    except RuntimeError:  # ORT's answer for a key never set
        return None


def test_spinning_settings_reach_onnx_runtime_and_only_the_online_service_opens_a_lone_session() -> None:
    sleeping = _session_options(2, spinning=False, spin_after_run=False, cpu_mem_arena=False)
    assert entry(sleeping, "session.intra_op.allow_spinning") == "0"
    within_runs = _session_options(2, spinning=True, spin_after_run=False, cpu_mem_arena=False)
    assert entry(within_runs, "session.force_spinning_stop") == "1"
    assert entry(within_runs, "session.intra_op.allow_spinning") is None
    ort_default = _session_options(2, spinning=True, spin_after_run=True, cpu_mem_arena=False)
    assert entry(ort_default, "session.force_spinning_stop") is None
    model = ModelSettings(id="cxr-triage")  # the defaults: threads sleep, a lone-run session online
    assert model.session_options()["lone_run_session"] is True
    assert model.session_options()["allow_spinning"] is False
    batch = model.session_options(intra_op_threads=1, lone_runs=False)
    assert batch["lone_run_session"] is False and batch["intra_op_threads"] == 1


class FlagRecordingPipeline(GatedPipeline):
    """The gated real pipeline, noting whether each inference was marked alone; an inference
    then waits for ``hold`` (when set), so that two screenings are under way together."""

    flags: ClassVar[list[bool]] = []
    hold: ClassVar[asyncio.Event | None] = None

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        self.flags.append(RUN_ALONE.get())
        if self.hold is not None:
            await self.hold.wait()
        return await super().infer(model_id, tensors)


def test_the_service_marks_only_a_screening_with_the_machine_to_itself_as_alone(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FlagRecordingPipeline.flags = []
    FlagRecordingPipeline.hold = None
    monkeypatch.setattr(test_api, "GatedPipeline", FlagRecordingPipeline)
    with running(tmp_path, predictor, store_dir, gate=True) as (client, pipe):
        files = [("files", ("a.dcm", (store_dir / "s41.dcm").read_bytes(), "application/dicom"))]
        first = client.post("/v1/screenings/upload", files=files).json()["screening_id"]
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        assert wait_for(client, first)["status"] == "DONE"
        assert FlagRecordingPipeline.flags == [True]
        # two screenings under way together: neither has the machine to itself
        client.portal.call(pipe().gate.clear)  # type: ignore[union-attr]
        FlagRecordingPipeline.hold = hold = asyncio.Event()
        jobs = []
        for name in ("s42.dcm", "s43.dcm"):
            files = [("files", ("a.dcm", (store_dir / name).read_bytes(), "application/dicom"))]
            jobs.append(client.post("/v1/screenings/upload", files=files).json()["screening_id"])
        deadline = time.monotonic() + 10
        while len(pipe().order) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        while len(FlagRecordingPipeline.flags) < 3 and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        client.portal.call(hold.set)  # type: ignore[union-attr]
        assert [wait_for(client, job)["status"] for job in jobs] == ["DONE", "DONE"]
        assert FlagRecordingPipeline.flags == [True, False, False]
