"""``dxassist models import|validate|shadow|compare|promote|rollback|versions|drift``: a model's
way from a file to monitored production, each step leaving evidence.

import     ONNX + import spec (here), MONAI Bundle or torchxrayvision weights (``training/``, run
           as a subprocess: serving never imports torch) -> a verified registry version
validate   screen the site's labelled studies -> JSON/HTML report, proposed thresholds, baseline
register   (``--from-validation``, in ``serving.cli.main``) accepted thresholds -> a new version
shadow     run a version beside the active one; its results are stored, never delivered
compare    agreement of a shadow version with the active one, per finding
promote    make a version active for the running service (audited; no restart)
rollback   switch back to the version active before the last switch (audited)
drift      inputs and scores per day against the validation baseline
feedback-export  readers' verdicts as a labelled CSV that ``validate --source store`` reads
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from models.errors import DxAssistError, ManifestError
from models.registry import REGISTRY_ROOT, resolve
from serving.cli.common import SettingsOpt, load_settings
from serving.settings import Settings

console = Console(soft_wrap=False, width=140)


def _settings(path: Path | None) -> Settings:
    return load_settings(path, console)


def _ref(ref: str) -> tuple[str, str]:
    model_id, sep, version = ref.partition("@")
    if not sep or not model_id or not version:
        console.print(f"[red]expected MODEL@VERSION, got {ref!r}[/red]")
        raise typer.Exit(2)
    return model_id, version


def _refuse(exc: Exception) -> typer.Exit:
    console.print(f"[red]refused:[/red] {type(exc).__name__}: {exc}")
    return typer.Exit(1)


def _actor(actor: str | None) -> str:
    return actor or getpass.getuser()


def import_model(
    onnx: Annotated[Path | None, typer.Argument(help="ONNX file (with --spec)")] = None,
    spec: Annotated[Path | None, typer.Option(help="import spec YAML: labels, codes, accepts, preprocessing")] = None,
    ood_folder: Annotated[
        Path | None, typer.Option(help="the site's own unlabelled in-distribution studies (OOD gate fit)")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="a MONAI Bundle folder (needs the train extra)")] = None,
    xrv: Annotated[Path | None, typer.Option(help="torchxrayvision DenseNet weights file (train extra)")] = None,
    model_id: Annotated[str | None, typer.Option("--id", help="--xrv: model id")] = None,
    version: Annotated[str | None, typer.Option(help="--xrv: version")] = None,
    labels: Annotated[str | None, typer.Option(help="--xrv: torchxrayvision output names, comma-separated")] = None,
    trained_on: Annotated[str | None, typer.Option(help="--xrv: what the weights were trained on")] = None,
    stage: Annotated[Path | None, typer.Option(help="only stage into this folder (no registration)")] = None,
) -> None:
    """Import a model as a new registry version (signature checked, sha256, OOD gate, model card)."""
    if bundle is not None or xrv is not None:
        if ood_folder is None:
            console.print("[red]--ood-folder is required[/red]")
            raise typer.Exit(2)
        if bundle is not None:
            if spec is None:
                console.print("[red]--bundle needs --spec (labels and codes)[/red]")
                raise typer.Exit(2)
            argv = ["-m", "training.import_bundle", str(bundle), str(spec), "--ood-folder", str(ood_folder)]
        else:
            if not (model_id and version and labels and trained_on):
                console.print("[red]--xrv needs --id, --version, --labels and --trained-on[/red]")
                raise typer.Exit(2)
            argv = ["-m", "training.import_xrv", str(xrv), "--id", model_id, "--version", version]
            argv += ["--labels", labels, "--trained-on", trained_on, "--ood-folder", str(ood_folder)]
        if stage is not None:
            argv += ["--stage", str(stage)]
        # training/ needs torch; serving does not import it, it runs it
        done = subprocess.run([sys.executable, *argv], check=False)
        raise typer.Exit(done.returncode)
    if onnx is None or spec is None:
        console.print("[red]give ONNX and --spec, or --bundle, or --xrv[/red]")
        raise typer.Exit(2)
    from models.importing import import_onnx, load_import_spec, stage_import

    try:
        parsed = load_import_spec(spec)
        if stage is not None:
            report = stage_import(onnx, parsed, stage, ood_folder=ood_folder)
        else:
            report = import_onnx(onnx, parsed, ood_folder=ood_folder)
    except DxAssistError as exc:
        raise _refuse(exc) from exc
    console.print(report.signature.describe())
    where = "staged" if stage is not None else "registered"
    console.print(f"{where} {report.manifest['id']}@{report.manifest['version']} at {report.staged}")
    if "ood" not in report.manifest:
        console.print("[yellow]no OOD gate: the graph exports no features output[/yellow]")


def validate(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION")],
    labels: Annotated[Path, typer.Option(help="ChestX-ray14/CheXpert CSV, or a Kvasir masks folder")],
    source: Annotated[
        str, typer.Option(help="folder: files under --images; store: Study UIDs from the CSV")
    ] = "folder",
    images: Annotated[Path | None, typer.Option(help="folder of the labelled DICOM files")] = None,
    target_sensitivity: Annotated[float, typer.Option(help="proposed operating points reach this")] = 0.95,
    out: Annotated[Path, typer.Option(help="report folder")] = Path("var/validation"),
    settings: SettingsOpt = None,
) -> None:
    """Screen the site's labelled studies with one version; write the validation report."""
    from serving.batch.validation import build_report, read_labels, screen_labelled, write_report

    model_id, version = _ref(ref)
    cfg = _settings(settings)
    try:
        loaded = resolve(model_id, version)
        if source not in ("folder", "store"):
            raise ManifestError("--source is folder or store")
        folder = images if images is not None else (labels.parent if labels.is_file() else labels / "images")
        items = read_labels(labels, loaded, folder if source == "folder" else None)
        study_source = None
        if source == "store":
            from serving.online.factory import build_source

            study_source = build_source(cfg)
        scored = screen_labelled(
            loaded,
            items,
            study_ref_key=cfg.security.study_ref_key.get_secret_value().encode(),
            source=study_source,
        )
        report = build_report(loaded, scored, target_sensitivity=target_sensitivity)
    except DxAssistError as exc:
        raise _refuse(exc) from exc
    json_path, html_path = write_report(out / f"{model_id}-{version}", report, scored)
    table = Table(box=None)
    for col in ("finding", "n (pos)", "AUROC (95% CI)", "threshold", "sens", "spec", "PPV", "NPV", "ECE", "proposed"):
        table.add_column(col)
    for key, f in report["findings"].items():
        prop = f.get("proposed")
        table.add_row(
            key,
            f"{f['n']} ({f['positives']})",
            f"{f['auroc']:.3f} ({f['auroc_ci95'][0]:.3f}-{f['auroc_ci95'][1]:.3f})",
            f"{f['threshold']:.4f}",
            f"{f['sensitivity']:.3f}",
            f"{f['specificity']:.3f}",
            f"{f['ppv']:.3f}",
            f"{f['npv']:.3f}",
            f"{f['ece']:.3f}",
            f"{prop['threshold']:.4f}" if prop else "-",
        )
    console.print(table)
    console.print(f"OOD refusal rate {report['ood_refusal_rate']}; report {json_path} and {html_path}")


def register_from_validation(report_dir: Path, new_version: str, accept: list[str] | None) -> Path:
    """A new version of the validated model with the accepted proposed thresholds; the report
    (JSON, HTML, drift baseline) is kept beside the new manifest."""
    from models.importing import derive_version

    report = json.loads((report_dir / "validation.json").read_text())
    model_id, _, from_version = str(report["model"]).partition("@")
    proposed: dict[str, Any] = report["proposed_thresholds"]
    keys = accept or sorted(proposed)
    missing = [k for k in keys if k not in proposed]
    if missing:
        raise ManifestError(f"no proposed threshold for {missing}")
    files = {
        n: report_dir / n for n in ("validation.json", "validation.html", "baseline.json") if (report_dir / n).is_file()
    }
    return derive_version(
        model_id,
        from_version,
        new_version,
        {k: (float(proposed[k]["threshold"]), str(proposed[k]["basis"])) for k in keys},
        root=REGISTRY_ROOT,
        report_files=files,
        note=f"Accepted from the site validation of {model_id}@{from_version} (target sensitivity "
        f"{report['target_sensitivity']}).",
    )


def _lifecycle(cfg: Settings) -> Any:
    from serving.persistence.lifecycle import LifecycleStore

    return LifecycleStore(cfg.results.target)


def _current(cfg: Settings, model_id: str) -> str:
    configured = next((m for m in cfg.models if m.id == model_id), None)
    if configured is None:
        console.print(f"[red]model {model_id!r} is not configured in these settings[/red]")
        raise typer.Exit(2)
    store = _lifecycle(cfg)
    try:
        return str(store.active_versions().get(model_id) or resolve(model_id, configured.version).manifest.version)
    finally:
        store.close()


def shadow(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION to run in shadow")],
    remove: Annotated[bool, typer.Option("--remove", help="stop shadowing this version")] = False,
    settings: SettingsOpt = None,
) -> None:
    """Run a version in shadow on live traffic (stored marked shadow, never delivered)."""
    from serving.online.versions import check_shadow

    model_id, version = _ref(ref)
    cfg = _settings(settings)
    current = _current(cfg, model_id)
    store = _lifecycle(cfg)
    try:
        if remove:
            store.remove_shadow(model_id, version)
            console.print(f"{ref} no longer runs in shadow")
            return
        check_shadow(resolve(model_id, current), resolve(model_id, version))
        store.add_shadow(model_id, version)
    except DxAssistError as exc:
        raise _refuse(exc) from exc
    finally:
        store.close()
    console.print(f"{ref} runs in shadow beside {model_id}@{current} from the next job on")


def compare(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION of the shadow version")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    settings: SettingsOpt = None,
) -> None:
    """Agreement of a shadow version with the active one, per finding, and where they disagree."""
    from serving.online.versions import compare_shadow
    from serving.persistence.results import ResultsStore

    model_id, version = _ref(ref)
    cfg = _settings(settings)
    store, results = _lifecycle(cfg), ResultsStore(cfg.results.target)
    try:
        comparison = compare_shadow(store, results, model_id, version)
    finally:
        store.close()
        results.close()
    if as_json:
        sys.stdout.write(
            json.dumps(
                {
                    "model": ref,
                    "studies": comparison.studies,
                    "unmatched": comparison.unmatched,
                    "findings": {f.key: vars(f.agreement) for f in comparison.findings},
                    "disagreements": [
                        {"study_ref": r, "finding": k, "active_score": a, "shadow_score": s}
                        for r, k, a, s in comparison.disagreements
                    ],
                },
                indent=2,
            )
            + "\n"
        )
        return
    table = Table(box=None)
    for col in ("finding", "n", "both +", "both -", "active only", "shadow only", "pos agr", "neg agr", "kappa", "r"):
        table.add_column(col)
    for f in comparison.findings:
        a = f.agreement
        table.add_row(
            f.key,
            str(a.n),
            str(a.both_positive),
            str(a.both_negative),
            str(a.only_a),
            str(a.only_b),
            f"{a.positive_agreement:.3f}",
            f"{a.negative_agreement:.3f}",
            f"{a.kappa:.3f}",
            f"{a.score_correlation:.3f}",
        )
    console.print(f"{ref} vs the active version over {comparison.studies} studies ({comparison.unmatched} unmatched)")
    console.print(table)
    for study, key, a_score, s_score in comparison.disagreements[:50]:
        console.print(f"  disagree: study ref {study}  {key}  active {a_score:.3f}  shadow {s_score:.3f}")


def promote(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION to make active")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit)")],
    actor: Annotated[str | None, typer.Option(help="who (default: this user)")] = None,
    settings: SettingsOpt = None,
) -> None:
    """Make a version active for the running service from its next job (audited)."""
    model_id, version = _ref(ref)
    cfg = _settings(settings)
    try:
        resolve(model_id, version)
    except DxAssistError as exc:
        raise _refuse(exc) from exc
    current = _current(cfg, model_id)
    store = _lifecycle(cfg)
    try:
        event = store.switch(model_id, version, action="promote", actor=_actor(actor), reason=reason, current=current)
        store.remove_shadow(model_id, version)
    finally:
        store.close()
    console.print(f"{model_id}: {current} -> {version} (audit #{event})")


def rollback(
    model_id: Annotated[str, typer.Argument(help="MODEL")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit)")],
    actor: Annotated[str | None, typer.Option(help="who (default: this user)")] = None,
    settings: SettingsOpt = None,
) -> None:
    """Switch back to the version that was active before the last switch (audited)."""
    cfg = _settings(settings)
    current = _current(cfg, model_id)
    store = _lifecycle(cfg)
    try:
        events = store.events(model_id)
        if not events:
            console.print(f"[red]{model_id} was never switched: nothing to roll back to[/red]")
            raise typer.Exit(1)
        previous = events[-1].from_version
        event = store.switch(model_id, previous, action="rollback", actor=_actor(actor), reason=reason, current=current)
    finally:
        store.close()
    console.print(f"{model_id}: {current} -> {previous} (audit #{event})")


def versions(model_id: Annotated[str, typer.Argument(help="MODEL")], settings: SettingsOpt = None) -> None:
    """The active and shadow versions of a model and the audit of its switches."""
    cfg = _settings(settings)
    current = _current(cfg, model_id)
    store = _lifecycle(cfg)
    try:
        console.print(f"active {model_id}@{current}; shadow {store.shadow_versions().get(model_id, [])}")
        for e in store.events(model_id):
            console.print(f"  #{e.id} {e.at} {e.action} {e.from_version} -> {e.to_version} by {e.actor}: {e.reason}")
    finally:
        store.close()


def drift(
    model_id: Annotated[str, typer.Argument(help="MODEL (its active version)")],
    days: Annotated[int, typer.Option(help="days back from today (UTC)")] = 7,
    baseline: Annotated[Path | None, typer.Option(help="baseline.json (default: beside the version)")] = None,
    out: Annotated[Path | None, typer.Option(help="write drift.json and drift.html here")] = None,
    prom_file: Annotated[
        Path | None, typer.Option(help="write the gauges here (node_exporter textfile collector, *.prom)")
    ] = None,
    settings: SettingsOpt = None,
) -> None:
    """Inputs and scores per day against the validation baseline; exit 1 when a threshold is crossed."""
    from serving.observability.drift import DriftMonitor

    cfg = _settings(settings)
    version = _current(cfg, model_id)
    ref = f"{model_id}@{version}"
    try:
        checks, feedback = drift_and_feedback(cfg, ref, days=days, baseline=baseline)
    except (DxAssistError, OSError, ValueError) as exc:
        raise _refuse(exc) from exc
    monitor = DriftMonitor()
    crossed = monitor.publish(ref, checks)
    if prom_file is not None:
        monitor.write_textfile(prom_file)
    table = Table(box=None)
    for col in ("day", "quantity", "statistic", "value", "threshold", "n", "crossed"):
        table.add_column(col)
    for c in checks:
        table.add_row(
            c.day, c.quantity, c.statistic, f"{c.value:.3f}", f"{c.threshold:.3f}", str(c.n), "YES" if c.crossed else ""
        )
    console.print(table)
    for key, counts in sorted(feedback.items()):
        console.print(f"feedback {key}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))
    if out is not None:
        write_drift_report(out, ref, checks, feedback)
        console.print(f"report {out / 'drift.json'} and {out / 'drift.html'}")
    if crossed:
        console.print(f"[red]{len(crossed)} drift thresholds crossed on the latest day[/red]")
        raise typer.Exit(1)


def drift_for(cfg: Settings, ref: str, *, days: int, baseline: Path | None) -> list[Any]:
    """Observations of the last ``days`` days of ``ref`` against its baseline -> drift checks."""
    return drift_and_feedback(cfg, ref, days=days, baseline=baseline)[0]


def drift_and_feedback(
    cfg: Settings, ref: str, *, days: int, baseline: Path | None
) -> tuple[list[Any], dict[str, dict[str, int]]]:
    """Drift checks, and the radiologists' feedback on this version's findings in the same days
    (``finding -> verdict -> count``, each reader's latest verdict per finding and screening)."""
    from serving.observability.drift import drift_checks, load_observations
    from serving.online.drift_watch import observations
    from serving.persistence.results import ResultsStore

    model_id, _, version = ref.partition("@")
    base_path = baseline or (resolve(model_id, version).directory / "baseline.json")
    if not base_path.is_file():
        raise ManifestError(f"{ref} has no baseline.json: validate it (models validate) or pass --baseline")
    base = load_observations(base_path)
    since = (datetime.now(UTC) - timedelta(days=days)).date().isoformat()
    results = ResultsStore(cfg.results.target)
    current = []
    feedback: dict[str, dict[str, int]] = {}
    try:
        for _row, public_id, _created, observation in observations(results, ref, since):
            current.append(observation)
            latest: dict[tuple[str, str], str] = {}
            for record in results.feedback_for(public_id) if public_id else []:
                latest[(record.reader_id, record.finding_key)] = str(record.verdict)
            for (_reader, key), verdict in latest.items():
                counts = feedback.setdefault(key, {})
                counts[verdict] = counts.get(verdict, 0) + 1
    finally:
        results.close()
    d = cfg.drift
    checks = drift_checks(base, current, psi_alert=d.psi_alert, ks_alert=d.ks_alert, min_studies=d.min_studies)
    return checks, feedback


def write_drift_report(
    out: Path, ref: str, checks: list[Any], feedback: dict[str, dict[str, int]] | None = None
) -> None:
    """``drift.json`` and ``drift.html`` (one plot per quantity: statistic per day vs its threshold)."""
    import base64
    import html
    import io
    from dataclasses import asdict

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(
        json.dumps({"model": ref, "checks": [asdict(c) for c in checks], "feedback": feedback or {}}, indent=2)
    )
    parts = [f"<html><head><meta charset='utf-8'><title>Drift {html.escape(ref)}</title></head><body>"]
    parts.append(f"<h1>Drift: {html.escape(ref)}</h1>")
    parts.append("<p>Radiologist feedback: " + html.escape(json.dumps(feedback or {})) + "</p>")
    for quantity, statistic in sorted({(c.quantity, c.statistic) for c in checks}):
        rows = [c for c in checks if c.quantity == quantity and c.statistic == statistic]
        fig, ax = plt.subplots(figsize=(6, 2.4))
        ax.plot([c.day for c in rows], [c.value for c in rows], "o-")
        ax.axhline(rows[0].threshold, color="red", linestyle=":")
        ax.set(title=f"{quantity} ({statistic})")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        image = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f"<h3>{html.escape(quantity)} {statistic}</h3><img src='data:image/png;base64,{image}'/>")
    parts.append("</body></html>")
    (out / "drift.html").write_text("\n".join(parts))


#: the one identifier a feedback export carries: what ``validate --source store`` fetches by
FEEDBACK_UID_COLUMN = "Study Instance UID"


def feedback_export(
    out: Annotated[Path, typer.Option(help="CSV to write (created 0600: it names studies by Study UID)")],
    model: Annotated[str | None, typer.Option(help="only findings of this model id (columns: its labels)")] = None,
    settings: SettingsOpt = None,
) -> None:
    """Readers' feedback as a labelled dataset: one row per study a reader judged, one column per
    finding (1 / 0 as the verdicts decide it, empty where no reader decided), in the CheXpert-style
    layout ``dxassist models validate --labels FILE --source store`` reads.

    Only what a site's own labels file for ``--source store`` holds: the Study Instance UID (to
    fetch the images from the store), the labels, the number of readers and the model versions
    judged; no patient, accession, reader id, comment or date."""
    from serving.persistence.feedback import feedback_labels

    cfg = _settings(settings)
    try:
        studies = feedback_labels(cfg.results.target, model_id=model)
        if model is not None:
            configured = next((m for m in cfg.models if m.id == model), None)
            version = configured.version if configured is not None else "latest"
            keys = [lab.key for lab in resolve(model, version).manifest.labels]
        else:
            keys = sorted({k for s in studies for k in s.labels})
    except DxAssistError as exc:
        raise _refuse(exc) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [[FEEDBACK_UID_COLUMN, *keys, "Readers", "Models"]]
    for study in studies:
        values = [str(study.labels[k]) if k in study.labels else "" for k in keys]
        lines.append([study.study_instance_uid, *values, str(study.readers), " ".join(study.models)])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(buffer.getvalue())
    os.chmod(out, 0o600)  # an existing file keeps its mode on open
    conflicts = sum(len(s.conflicts) for s in studies)
    labelled = sum(len(s.labels) for s in studies)
    console.print(
        f"{len(studies)} studies, {labelled} labels decided by readers ({conflicts} left out: screenings disagree) -> {out}"
    )
    if not studies:
        raise typer.Exit(1)


def add_lifecycle_commands(app: typer.Typer) -> None:
    """Add the lifecycle verbs to the ``dxassist models`` group."""
    app.command("import")(import_model)
    app.command("validate")(validate)
    app.command("shadow")(shadow)
    app.command("compare")(compare)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("versions")(versions)
    app.command("drift")(drift)
    app.command("feedback-export")(feedback_export)
