"""``dxassist``: screen studies, run the demo, manage model versions.

dxassist demo                     build the demo study set and screen it (embedded defaults)
dxassist screen PATH... [--json]  screen DICOM files or folders
dxassist models list|verify       registered model versions and their checksums
dxassist models register DIR      add a staged version (never overwrites)
dxassist db upgrade|current       the results database's schema (migrations)
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from models.errors import DxAssistError, ResultsDatabaseError
from models.registry import list_versions, resolve, verify_all
from models.results import OutcomeValues, ScreeningResult
from serving.cli.common import SettingsOpt, load_settings
from serving.cli.models import add_lifecycle_commands, register_from_validation
from serving.dicom.sources.local import candidate_files
from serving.observability.phi import install_logging
from serving.settings import Settings

if TYPE_CHECKING:
    pass

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="Registered model versions.")
app.add_typer(models_app, name="models")
add_lifecycle_commands(models_app)  # import, validate, shadow, compare, promote, rollback, versions, drift
outbox_app = typer.Typer(no_args_is_help=True, help="Deliveries of results to the EMR and the PACS.")
app.add_typer(outbox_app, name="outbox")
db_app = typer.Typer(no_args_is_help=True, help="The results database's schema (Alembic migrations).")
app.add_typer(db_app, name="db")
console = Console(soft_wrap=False, width=120)


def _load_settings(path: Path | None) -> Settings:
    return load_settings(path, console)


def _print_results(results: list[ScreeningResult]) -> None:
    for result in results:
        labels = ", ".join(i.label for i in result.images)
        if result.outcome == OutcomeValues.SCREENED:
            head = f"[green]SCREENED[/green] by {', '.join(result.models)}  priority [bold]{result.priority}[/bold]"
        else:
            head = f"[yellow]NOT_SCREENED[/yellow]  reason [bold]{result.reason}[/bold]: {result.reason_detail}"
        ref = f"  (study ref {result.study_ref})" if result.study_ref else ""
        console.print(f"\n[bold]{labels}[/bold]{ref}\n  {head}")
        if result.findings:
            table = Table(show_edge=False, pad_edge=False, box=None)
            for col in ("finding", "score", "threshold", "result", "model", "where"):
                table.add_column(col)
            for f in result.findings:
                where = ""
                if f.region and f.positive:  # a map of a negative finding points at noise
                    r = f.region
                    where = f"x {r.x:.2f}-{r.x + r.width:.2f}, y {r.y:.2f}-{r.y + r.height:.2f}"
                    if f.frame_index is not None:
                        where += f", frame {f.frame_index}"
                verdict = "[red]POSITIVE[/red]" if f.positive else "negative"
                table.add_row(
                    f.display, f"{f.score:.3f}", f"{f.threshold:.3f}", verdict, f"{f.model_id}@{f.model_version}", where
                )
            console.print(table)
        rejected = [i for i in result.images if i.outcome == OutcomeValues.NOT_SCREENED]
        if result.outcome == OutcomeValues.SCREENED and rejected:
            for image in rejected:
                console.print(f"  not screened: {image.label}: {image.reason} ({image.reason_detail})")


def _run_screen(
    paths: list[Path],
    settings: Settings,
    *,
    as_json: bool,
    per_file: bool,
    save: bool,
    dicom_out: Path | None = None,
) -> list[ScreeningResult]:
    from serving.core.screening import screen_paths
    from serving.online.factory import build_screener
    from serving.persistence.results import ResultsStore

    files: list[Path] = []
    for p in paths:
        if not p.exists():
            console.print(f"[red]no such file or folder:[/red] {p}")
            raise typer.Exit(2)
        files.extend(candidate_files(p))
    try:
        screener = build_screener(settings)
    except DxAssistError as exc:
        console.print(f"[red]model error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if dicom_out is not None:  # also write the SR, GSPS, SC and SEG the store-back would store
        from serving.dicom.export import screen_to_folder

        exported = screen_to_folder(
            screener, files, dicom_out, objects=settings.store.write_objects, group_by_study=not per_file
        )
        results = [r for r, _ in exported]
        if not as_json:  # stdout carries only the JSON then
            written = sum(len(w) for _, w in exported)
            console.print(f"{written} DICOM result objects written to {dicom_out}", highlight=False)
    else:
        results = screen_paths(screener, files, group_by_study=not per_file)
    if save:
        store = ResultsStore(settings.results.target)
        for r in results:
            store.save(r)
        store.close()
    if as_json:
        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in results], indent=2) + "\n")
    else:
        _print_results(results)
        n_ok = sum(r.outcome == OutcomeValues.SCREENED for r in results)
        console.print(f"\n{len(results)} studies: {n_ok} screened, {len(results) - n_ok} not screened.")
        if save:
            console.print(f"Results saved to {settings.results.where}")
    return results


@app.command()
def screen(
    paths: Annotated[list[Path] | None, typer.Argument(help="DICOM files or folders")] = None,
    uids: Annotated[
        Path | None, typer.Option(help="batch job: file of StudyInstanceUIDs (one a line) to fetch from the store")
    ] = None,
    query_modality: Annotated[str | None, typer.Option(help="batch job: QIDO-RS search of the store, modality")] = None,
    query_dates: Annotated[str | None, typer.Option(help="batch job: QIDO-RS StudyDate, YYYYMMDD-YYYYMMDD")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="run as a batch job on Ray: results, ledger and report in this folder (resumable)"),
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for a batch job (default: local)")] = None,
    prepare_actors: Annotated[int, typer.Option(help="batch job, staged: decode/preprocess actors")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
    per_file: Annotated[bool, typer.Option("--per-file", help="one result per file instead of per study")] = False,
    dicom_out: Annotated[
        Path | None,
        typer.Option(help="also write the DICOM result objects (SR, GSPS, SC, SEG; store.write_objects) here"),
    ] = None,
    save: Annotated[bool, typer.Option("--save/--no-save", help="record results in the results store")] = True,
    deliver: Annotated[
        bool,
        typer.Option(
            "--deliver", help="batch job: send results through the outbox to the EMR/PACS (emr.*, store.write_results)"
        ),
    ] = False,
    settings: SettingsOpt = None,
) -> None:
    """Screen DICOM files or folders and print the findings (with --out: a resumable batch job).

    Every file that can be screened is; the others are reported NOT_SCREENED with a reason.

    Exit codes:

    0  every study screened

    1  some study not screened (batch job: or not fetched)

    2  usage or configuration error (arguments, paths, settings, models)
    """
    install_logging(logging.WARNING)
    paths = paths or []
    from_store = uids is not None or query_modality is not None or query_dates is not None
    if deliver and (out is None or not save):
        console.print("[red]--deliver needs --out (a batch job) and --save[/red]")
        raise typer.Exit(2)
    if out is None:
        if from_store or not paths:
            console.print("[red]--uids/--query-* need --out (a batch job); give files or folders otherwise[/red]")
            raise typer.Exit(2)
        results = _run_screen(
            paths, _load_settings(settings), as_json=as_json, per_file=per_file, save=save, dicom_out=dicom_out
        )
        if any(r.outcome != OutcomeValues.SCREENED for r in results):
            raise typer.Exit(1)
        return
    study_uids: list[str] = []
    if uids is not None:
        study_uids += uids.read_text().split()
    if query_modality or query_dates:
        study_uids += _query_store(_load_settings(settings), query_modality, query_dates)
    _run_batch(
        paths,
        out,
        settings,
        address=address,
        prepare_actors=prepare_actors,
        save=save,
        study_uids=study_uids,
        deliver=deliver,
    )


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="the export folder (de-identified DICOM, images, labels)")],
    uids: Annotated[Path | None, typer.Option(help="file of StudyInstanceUIDs (one a line) to export")] = None,
    query_modality: Annotated[str | None, typer.Option(help="search the store: modality")] = None,
    query_dates: Annotated[str | None, typer.Option(help="search the store: StudyDate, YYYYMMDD-YYYYMMDD")] = None,
    layout: Annotated[
        str | None, typer.Option(help="labels layout: chestxray14 or kvasir (default: export.layout)")
    ] = None,
    settings: SettingsOpt = None,
) -> None:
    """Export screened studies from the store, de-identified (PS3.15 Basic Profile, export.*
    options), with labels in the ChestX-ray14 or Kvasir layout, for retraining.

    Exit codes: 0 exported, 1 nothing exported, 2 usage or configuration error.
    """
    install_logging(logging.WARNING)
    from serving.export.job import run_export

    cfg = _load_settings(settings)
    if layout is not None:
        if layout not in ("chestxray14", "kvasir"):
            console.print("[red]--layout: chestxray14 or kvasir[/red]")
            raise typer.Exit(2)
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"layout": layout})})
    study_uids = uids.read_text().split() if uids is not None else []
    if query_modality or query_dates:
        study_uids += _query_store(cfg, query_modality, query_dates)
    if not study_uids:
        console.print("[red]nothing to export: give --uids or --query-*[/red]")
        raise typer.Exit(2)
    try:
        summary = run_export(cfg, study_uids, out)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    skipped = ", ".join(f"{n} {why}" for why, n in summary.skipped.items()) or "none"
    console.print(
        f"exported {summary.studies} studies ({summary.instances} instances, {summary.images} images) "
        f"to {out}; skipped: {skipped}"
    )
    if summary.studies == 0:
        raise typer.Exit(1)


def _query_store(cfg: Settings, modality: str | None, dates: str | None) -> list[str]:
    from serving.dicom.sources import SearchableSource
    from serving.online.factory import build_source

    source = build_source(cfg)
    if not isinstance(source, SearchableSource):
        console.print("[red]--query-* needs a store that can be searched (store.kind: dicomweb or dimse)[/red]")
        raise typer.Exit(2)
    try:
        return source.search_studies(modality=modality, study_date=dates)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _run_batch(
    paths: list[Path],
    out: Path,
    settings: Path | None,
    *,
    address: str | None,
    prepare_actors: int,
    save: bool,
    study_uids: list[str] | None = None,
    deliver: bool = False,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from serving.batch.job import run_batch_job
    from serving.batch.report import write_report, write_tables

    for p in paths:
        if not p.exists():
            console.print(f"[red]no such file or folder:[/red] {p}")
            raise typer.Exit(2)
    columns = (
        TextColumn("screening"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.2f} studies/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("screen", total=None, rate=0.0)
        import time

        started = time.perf_counter()  # the rate counts the whole wait, Ray's start-up included

        def update(done: int, total: int) -> None:
            elapsed = max(time.perf_counter() - started, 1e-6)
            progress.update(task, completed=done, total=total, rate=done / elapsed)

        summary = run_batch_job(
            paths,
            out,
            study_uids=study_uids,
            settings_path=str(settings) if settings else None,
            address=address,
            prepare_actors=prepare_actors,
            on_progress=update,
            save_to_results_store=save,
            deliver=deliver,
        )
    csv_path, parquet_path = write_tables(summary.results, out)
    report = write_report(
        summary.results,
        out,
        inputs=paths,
        seconds=summary.seconds,
        screened_now=summary.screened_now,
        skipped=summary.skipped,
    )
    n_ok = sum(r.outcome == OutcomeValues.SCREENED for r in summary.results)
    console.print(
        f"{summary.planned} studies planned, {summary.skipped} already done, {summary.screened_now} screened now "
        f"({summary.studies_per_s:.2f} studies/s). Job total: {n_ok} screened, {len(summary.results) - n_ok} not screened."
    )
    if summary.errors:
        kinds = Counter(error.partition(":")[0] for error in summary.errors.values())
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        console.print(
            f"[yellow]{len(summary.errors)} studies could not be read or fetched ({why}): no result is recorded "
            "for them; run the same command again to retry them[/yellow]"
        )
    console.print(f"Results: {csv_path}, {parquet_path}\nReport:  {report}")
    if summary.errors or n_ok < len(summary.results):
        raise typer.Exit(1)


def _screen_over_http(
    base: str, files: list[Path], token: str | None, timeout_s: float = 300.0
) -> list[ScreeningResult]:
    """Upload each file as its own screening, poll until done; labels are the file paths."""
    import time

    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    jobs: list[tuple[Path, str]] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
        for path in files:
            response = client.post(
                "/v1/screenings/upload", files=[("files", (path.name, path.read_bytes(), "application/dicom"))]
            )
            response.raise_for_status()
            jobs.append((path, response.json()["screening_id"]))
        results = []
        deadline = time.monotonic() + timeout_s
        for path, job_id in jobs:
            while True:
                body = client.get(f"/v1/screenings/{job_id}").json()
                if body["status"] in ("DONE", "FAILED") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if body["status"] != "DONE":
                raise RuntimeError(f"screening of {path.name} ended {body['status']}: {body.get('error_reason')}")
            result = ScreeningResult.model_validate(body["result"])
            images = [i.model_copy(update={"label": str(path)}) for i in result.images]
            results.append(result.model_copy(update={"images": images}))
    return results


@app.command()
def serve(
    settings: SettingsOpt = None,
    host: Annotated[
        str | None, typer.Option(help="bind address (default api.host; non-loopback needs API tokens)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (default api.port)")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs for the local Ray instance")] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="join this running Ray cluster (ray://HEAD:10001, or the GCS HEAD:6379), deploy the Ray "
            "Serve application there and return; it runs until `serve delete`"
        ),
    ] = None,
    serve_config: Annotated[
        Path | None,
        typer.Option(
            help="with --address: a Serve config file (configs/serve/cluster.yaml) for the HTTP options and "
            "the deployments' replicas and resources; its args.settings_path is used unless --settings is given"
        ),
    ] = None,
) -> None:
    """Run the service until SIGTERM or Ctrl-C: one process on uvicorn (``serve.runtime: asgi``, the
    default) or the Ray Serve application on a local, loopback-bound Ray (``serve.runtime: ray``).
    With ``--address``, deploy the Ray Serve application onto that cluster instead and return.

    Stopping is graceful: admission closes at once (503 with Retry-After), running screenings
    finish (up to ``api.drain_timeout_s``), queued ones stay persisted and resume at the next
    start; the exit status is 0. Without API tokens the API is open, so it binds loopback only.
    """
    import signal
    import threading

    from serving.rayserve.local_cluster import drain_app, local_serve
    from serving.settings import is_loopback

    install_logging(logging.INFO)
    if address is not None:
        _deploy_to_cluster(address, settings, serve_config)
        return
    if serve_config is not None:
        console.print("[red]--serve-config goes with --address (locally: `serve run CONFIG`)[/red]")
        raise typer.Exit(2)
    cfg = _load_settings(settings)
    bind = host or cfg.api.host
    if not cfg.api.tokens:
        if not is_loopback(bind):
            console.print(
                f"[red]refusing to bind {bind}: no API tokens are configured, so the API would be open to "
                "anyone who can reach it. Set DXASSIST_API__TOKENS, or bind 127.0.0.1.[/red]"
            )
            raise typer.Exit(2)
        console.print(
            "[bold yellow]DEV MODE: no API tokens configured. The API is open to every process on this "
            "machine and answers loopback clients only. Set DXASSIST_API__TOKENS for anything else.[/bold yellow]"
        )
    if cfg.serve.runtime == "asgi":
        from serving.asgi.app import run

        scheme = "https" if cfg.api.tls_certfile else "http"
        console.print(f"dxassist serving at {scheme}://{bind}:{port or cfg.api.port} (one process). Ctrl-C to stop.")
        run(cfg, host=bind, port=port or cfg.api.port)
        console.print("stopped")
        return
    stop = threading.Event()
    tls = (cfg.api.tls_certfile, cfg.api.tls_keyfile) if cfg.api.tls_certfile and cfg.api.tls_keyfile else None
    # a signal before Ray is up stops as usual; from ray.init on, local_serve routes it to ``stop``
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with local_serve(
        str(settings) if settings else None,
        host=bind,
        port=port or cfg.api.port,
        num_cpus=num_cpus,
        tls=tls,
        on_stop=stop.set,
    ) as base:
        console.print(f"dxassist serving at {base} (OpenAPI document: {base}/openapi.json). Ctrl-C to stop.")
        while not stop.wait(0.5):
            pass
        console.print(f"stopping: admission closed, waiting up to {cfg.api.drain_timeout_s:.0f} s for running work")
        finished = drain_app(cfg.api.drain_timeout_s)
        console.print("drained" if finished else "drain timed out: unfinished screenings resume at the next start")
    console.print("stopped")


def _deploy_to_cluster(address: str, settings: Path | None, serve_config: Path | None) -> None:
    """``dxassist serve --address``: settings resolved and models pinned here, deployed there."""
    from models.errors import DxAssistError
    from serving.rayserve.local_cluster import deploy_to_cluster, driver_settings, read_serve_config
    from serving.settings import REPO_ROOT, is_loopback

    config = None
    if serve_config is not None:
        try:
            config = read_serve_config(serve_config)
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            console.print(f"[red]Serve config error:[/red] {type(exc).__name__}: {str(exc)[:500]}")
            raise typer.Exit(2) from exc
    path: Path | None = settings
    if path is None and config is not None and config.settings_path:
        path = Path(config.settings_path)
        path = path if path.is_absolute() else REPO_ROOT / path  # a config's paths are the install's
    try:
        cfg = driver_settings(path)
    except (OSError, ValueError, DxAssistError) as exc:  # settings messages never quote values
        console.print(f"[red]cannot deploy:[/red] {exc}")
        raise typer.Exit(2) from exc
    if cfg.results.url is None:
        console.print(
            "[red]refusing to deploy to a cluster with SQLite results: each ingress would write to a file on its "
            "own node. Set DXASSIST_RESULTS__URL=postgresql://... here (it travels with the application).[/red]"
        )
        raise typer.Exit(2)
    host = str((config.http_options if config else {}).get("host", "127.0.0.1"))
    if not cfg.api.tokens and not is_loopback(host):
        console.print(
            f"[red]refusing to serve on {host}: no API tokens are configured, so the API would be open to "
            "anyone who can reach it. Set DXASSIST_API__TOKENS here (it travels with the application).[/red]"
        )
        raise typer.Exit(2)
    pinned = ", ".join(f"{m.id}@{m.version} (sha256 {(m.artifact_sha256 or '')[:12]}...)" for m in cfg.models)
    console.print(
        f"deploying to {address}: topology {cfg.serve.topology}, results in {cfg.results.where}; models {pinned}"
    )
    try:
        deploy_to_cluster(address, cfg, config)
    except (ConnectionError, RuntimeError, DxAssistError) as exc:
        console.print(f"[red]deployment failed:[/red] {type(exc).__name__}: {str(exc)[:500]}")
        raise typer.Exit(1) from exc
    name = config.name if config else "dxassist"
    console.print(f"application {name!r} is running on the cluster; stop it with `serve delete {name}`")


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option(help="where to build the demo study set (default: the local store)")
    ] = None,
    local: Annotated[bool, typer.Option("--local", help="screen in this process, without Ray Serve")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    settings: SettingsOpt = None,
) -> None:
    """Build the demo study set, start the service, screen every demo file through the HTTP API."""
    import secrets

    from serving.cli.demo import build_demo_set
    from serving.rayserve.local_cluster import local_serve

    install_logging(logging.WARNING)
    cfg = _load_settings(settings)
    root = build_demo_set(out or cfg.store.path / "demo")
    if not as_json:
        console.print(f"Demo study set: {root}  (expected outcomes in expected.csv)")
    if local:
        _run_screen([root], cfg, as_json=as_json, per_file=True, save=True)
        return
    files = candidate_files(root)
    token = secrets.token_urlsafe(32)
    if not as_json:
        runtime = "one process" if cfg.serve.runtime == "asgi" else "Ray Serve, local"
        console.print(f"Starting the service ({runtime}) ...")
    if cfg.serve.runtime == "asgi":
        from serving.asgi.app import local_asgi
        from serving.settings import ApiSettings

        api = ApiSettings.model_validate(cfg.api.model_dump() | {"tokens": [token]})  # an admin token
        with_token = cfg.model_copy(update={"api": api})
        with local_asgi(with_token, port=_free_port()) as base:
            results = _screen_over_http(base, files, token)
    else:
        with local_serve(str(settings) if settings else None, port=_free_port(), api_token=token) as base:
            results = _screen_over_http(base, files, token)
    if as_json:
        sys.stdout.write(json.dumps([r.model_dump(mode="json") for r in results], indent=2) + "\n")
        return
    _print_results(results)
    n_ok = sum(r.outcome == OutcomeValues.SCREENED for r in results)
    console.print(
        f"\n{len(results)} files screened through the HTTP API: {n_ok} screened, {len(results) - n_ok} not screened."
    )
    console.print(f"Results saved to {cfg.results.where}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@models_app.command("list")
def models_list() -> None:
    """Registered model versions."""
    table = Table(box=None)
    for col in ("model", "version", "task", "labels", "artifact sha256", "trained on"):
        table.add_column(col)
    for entry in list_versions():
        m = resolve(entry.model_id, entry.version).manifest
        table.add_row(
            m.id,
            m.version,
            m.task.value,
            ", ".join(lab.key for lab in m.labels),
            m.artifact.sha256[:16] + "...",
            m.provenance.trained_on[:60],
        )
    console.print(table)


@models_app.command("verify")
def models_verify() -> None:
    """Check every registered version's manifest and artifact checksum; exit 1 on any failure."""
    reports = verify_all()
    for r in reports:
        console.print(f"{'[green]ok[/green]' if r.ok else '[red]FAIL[/red]'}  {r.ref}  {r.detail}")
    if not reports or not all(r.ok for r in reports):
        raise typer.Exit(1)


@models_app.command("register")
def models_register(
    staged: Annotated[Path | None, typer.Argument(help="staged folder with manifest.yaml, artifact, card")] = None,
    from_validation: Annotated[
        Path | None, typer.Option(help="a `models validate` report folder: its proposed thresholds become --version")
    ] = None,
    version: Annotated[str | None, typer.Option(help="with --from-validation: the new version")] = None,
    accept: Annotated[
        str | None, typer.Option(help="with --from-validation: comma-separated findings to take (default all)")
    ] = None,
) -> None:
    """Register a staged model version beside the existing ones (refuses to overwrite); or, with
    --from-validation, a new version with the site's proposed thresholds, the report beside it."""
    from models.registry import register_version

    try:
        if from_validation is not None:
            if version is None:
                console.print("[red]--from-validation needs --version[/red]")
                raise typer.Exit(2)
            keys = [k.strip() for k in accept.split(",") if k.strip()] if accept else None
            target = register_from_validation(from_validation, version, keys)
        elif staged is None:
            console.print("[red]give a staged folder or --from-validation[/red]")
            raise typer.Exit(2)
        else:
            target = register_version(staged)
    except (DxAssistError, FileExistsError) as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"registered {target}")


@outbox_app.command("status")
def outbox_status(settings: SettingsOpt = None) -> None:
    """Pending, delivered and dead-lettered deliveries, per sink."""
    from serving.persistence.outbox import Outbox

    cfg = _load_settings(settings)
    outbox = Outbox(cfg.results.target)
    status = outbox.status()
    table = Table(box=None)
    for col in ("sink", "pending", "done", "dead"):
        table.add_column(col)
    for sink, counts in sorted(status.by_sink.items()):
        table.add_row(sink, str(counts.get("PENDING", 0)), str(counts.get("DONE", 0)), str(counts.get("DEAD", 0)))
    console.print(table)
    for delivery_id, sink, error in outbox.dead():
        console.print(f"dead: #{delivery_id} {sink}: {error}")
    outbox.close()


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="delivery ids (default: every dead-lettered one)")] = None,
    settings: SettingsOpt = None,
) -> None:
    """Put dead-lettered deliveries back in the queue; the running service delivers them."""
    from serving.persistence.outbox import Outbox

    outbox = Outbox(_load_settings(settings).results.target)
    console.print(f"{outbox.retry_dead(ids or None)} deliveries queued again")
    outbox.close()


@db_app.command("upgrade")
def db_upgrade(settings: SettingsOpt = None) -> None:
    """Apply every pending schema migration to the results database (one transaction).

    The service, the CLI and batch jobs do the same when they open the database; run this by
    hand to upgrade at a chosen moment, e.g. right after a backup. Exit 1 when refused."""
    from serving.persistence.database import Database
    from serving.persistence.migrate import state, upgrade

    cfg = _load_settings(settings)
    db = None
    try:
        db = Database(cfg.results.target)
        before = state(db)
        after = upgrade(db)
    except ResultsDatabaseError as exc:
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if db is not None:
            db.close()
    was = before.current or ("the pre-migration schema" if before.legacy else "empty")
    console.print(f"results database ({cfg.results.where}): {was} -> revision {after.current} (head)")


@db_app.command("current")
def db_current(settings: SettingsOpt = None) -> None:
    """The results database's schema revision and the newest this dxassist knows; exit 1 when
    an upgrade is pending (or the schema is newer than this dxassist)."""
    from serving.persistence.database import Database
    from serving.persistence.migrate import state

    cfg = _load_settings(settings)
    db = None
    try:
        db = Database(cfg.results.target)
        now = state(db)
    except ResultsDatabaseError as exc:
        console.print(f"[red]unavailable:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if db is not None:
            db.close()
    current = now.current or ("pre-migration schema" if now.legacy else "empty")
    if now.up_to_date:
        verdict = "up to date"
    elif now.newer:
        verdict = "newer than this dxassist: run the version that upgraded it"
    else:
        verdict = "upgrade pending: dxassist db upgrade"
    console.print(f"results database ({cfg.results.where}): revision {current}, head {now.head}: {verdict}")
    if not now.up_to_date:
        raise typer.Exit(1)


def main() -> None:
    """The ``dxassist`` command. The modules loaded by then live as long as the command: frozen
    out of every garbage collection and out of the last one at exit (measured: it exits 0.5 s
    sooner; a long-running ``serve`` has less to walk in each full collection)."""
    gc.freeze()
    app()


if __name__ == "__main__":
    main()
