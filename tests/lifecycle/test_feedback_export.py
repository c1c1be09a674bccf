"""Radiologists' feedback round-trips: verdicts posted through the API (two readers, a changed
mind, an uncertain verdict, a contradiction) -> `dxassist models feedback-export` -> a CSV that
`dxassist models validate --source store` reads and screens from the store. The export holds
each study's UID and the labels the verdicts decide, nothing else: no reader, comment or date."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

from models.predictor import OnnxPredictor
from models.registry import resolve
from models.synthetic.cxr import generate_cxr_dataset, label_vector
from serving.cli.main import app
from tests.serving.test_api import running, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
READER_1 = {"Authorization": "Bearer reader-one-secret"}
READER_2 = {"Authorization": "Bearer reader-two-secret"}
TOKENS = [
    SecretStr("admin-secret"),
    SecretStr("reader-1:reader:reader-one-secret"),
    SecretStr("reader-2:reader:reader-two-secret"),
]
COMMENT = "CANARY-COMMENT small apical pneumothorax"


def test_feedback_through_the_api_exports_as_labels_that_validate_reads(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    generate_cxr_dataset(store_dir, 5, seed=61, size=(320, 320), prevalence=0.5)
    with (store_dir / "Data_Entry.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    loaded = resolve("cxr-triage")
    keys = [label.key for label in loaded.manifest.labels]
    uids = [str(pydicom.dcmread(store_dir / r["Image Index"], stop_before_pixels=True).StudyInstanceUID) for r in rows]
    results_db = tmp_path / "results.sqlite3"
    expected: dict[str, dict[str, int]] = {}
    with running(tmp_path, OnnxPredictor(loaded, providers="cpu"), store_dir, tokens=TOKENS, db=results_db) as (
        client,
        _,
    ):
        ai: list[dict[str, int]] = []
        ids = []
        for uid in uids:
            job = client.post("/v1/screenings", json={"study_instance_uid": uid}, headers=ADMIN).json()["screening_id"]
            body = wait_for(client, job, ADMIN, timeout=120)
            assert body["status"] == "DONE" and body["result"]["outcome"] == "SCREENED"
            ai.append({f["key"]: int(f["positive"]) for f in body["result"]["findings"]})
            ids.append(job)

        def say(n: int, key: str, verdict: str, headers: dict[str, str], comment: str | None = None) -> None:
            url = f"/v1/screenings/{ids[n]}/feedback"
            answer = client.post(
                url, json={"finding_key": key, "verdict": verdict, "comment": comment}, headers=headers
            )
            assert answer.status_code == 201, answer.text

        # study 0: reader 1 judges every finding against the truth -> the labels are the truth
        truth = dict(zip(keys, (int(v) for v in label_vector(rows[0]["Finding Labels"], keys)), strict=True))
        for key in keys:
            say(0, key, "agree" if ai[0][key] == truth[key] else "disagree", READER_1, COMMENT)
        expected[uids[0]] = truth
        # study 1: reader 1 disagrees, then changes their mind: the latest verdict (agree) counts
        say(1, "pneumothorax", "disagree", READER_1)
        say(1, "pneumothorax", "agree", READER_1)
        expected[uids[1]] = {"pneumothorax": ai[1]["pneumothorax"]}
        # study 2: only an uncertain verdict: nothing decided, not exported
        say(2, "cardiomegaly", "uncertain", READER_1)
        # study 3: the readers contradict each other on cardiomegaly (left out); both disagree on effusion
        say(3, "cardiomegaly", "agree", READER_1)
        say(3, "cardiomegaly", "disagree", READER_2)
        say(3, "pleural_effusion", "disagree", READER_1)
        say(3, "pleural_effusion", "disagree", READER_2)
        expected[uids[3]] = {"pleural_effusion": 1 - ai[3]["pleural_effusion"]}
        # study 4: no feedback, not exported

    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "store": {"kind": "local", "path": str(store_dir)},
                "results": {"sqlite_path": str(results_db)},
                "screening": {"decode_isolation": "inline"},
            }
        )
    )
    out = tmp_path / "feedback" / "labels.csv"
    runner = CliRunner()
    run = runner.invoke(
        app, ["models", "feedback-export", "--out", str(out), "--model", "cxr-triage", "--settings", str(settings)]
    )
    assert run.exit_code == 0, run.output
    assert "3 studies" in run.output
    assert out.stat().st_mode & 0o077 == 0
    text = out.read_text()
    assert "reader-1" not in text and "reader-2" not in text and "CANARY" not in text
    with out.open(newline="") as fh:
        exported = list(csv.DictReader(fh))
    assert list(exported[0]) == ["Study Instance UID", *keys, "Readers", "Models"]
    got = {r["Study Instance UID"]: {k: int(r[k]) for k in keys if r[k] != ""} for r in exported}
    assert got == expected
    assert {r["Study Instance UID"]: r["Readers"] for r in exported} == {uids[0]: "1", uids[1]: "1", uids[3]: "2"}
    assert all(r["Models"] == loaded.manifest.ref for r in exported)

    # models validate reads the export and screens the studies from the store by their UIDs
    run = runner.invoke(
        app,
        [
            "models",
            "validate",
            loaded.manifest.ref,
            "--labels",
            str(out),
            "--source",
            "store",
            "--out",
            str(tmp_path / "validation"),
            "--settings",
            str(settings),
        ],
    )
    assert run.exit_code == 0, run.output
    report = json.loads(
        (tmp_path / "validation" / f"cxr-triage-{loaded.manifest.version}" / "validation.json").read_text()
    )
    assert report["studies"] == 3 and report["screened"] == 3
    for key in keys:
        labelled = [labels[key] for labels in expected.values() if key in labels]
        assert report["findings"][key]["n"] == len(labelled)
        assert report["findings"][key]["positives"] == sum(labelled)
