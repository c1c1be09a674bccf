"""The training command line, on typer like ``dxassist``: ``python -m training.cli cxr|polyp``.

``--set KEY=VALUE`` overrides one field of the training config (``data.n_train=64``,
``train.bf16=false``); each value is read as a YAML scalar or list, then the whole config is
validated by ``TrainConfig``, so a typo or a wrong type fails before any training starts.

``--source store --store-settings S --uids F`` pulls the labelled studies from the DICOM store
first (``dxassist export``: through the configured ``StudySource``, de-identified on the way)
and trains on that export; the manifest and model card record what the data really was
(``training/provenance.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from training.config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and stage the reference models.")

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config field, KEY=VALUE (repeatable), e.g. data.n_train=64"),
]
OutOpt = Annotated[Path | None, typer.Option(help="work folder: data, plots, the staged version")]
RegisterOpt = Annotated[bool, typer.Option("--register", help="copy the staged version into models/registry")]
SourceOpt = Annotated[
    str | None,
    typer.Option(
        help="data.source: synthetic, store (pull labelled studies from the DICOM store with `dxassist export`,"
        " de-identified), or a folder (a `dxassist export` folder is recognised)"
    ),
]
StoreSettingsOpt = Annotated[
    Path | None, typer.Option("--store-settings", help="--source store: dxassist settings (store, results, export)")
]
UidsOpt = Annotated[Path | None, typer.Option(help="--source store: file of Study Instance UIDs to export")]
QueryModalityOpt = Annotated[str | None, typer.Option(help="--source store: search the store by modality")]
QueryDatesOpt = Annotated[str | None, typer.Option(help="--source store: search by StudyDate, YYYYMMDD-YYYYMMDD")]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to a mapping; values are YAML scalars/lists (``true``, ``64``, ``[1, 2]``, ``tiny``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def data_overrides(
    source: str | None,
    store_settings: Path | None,
    uids: Path | None,
    query_modality: str | None,
    query_dates: str | None,
) -> dict[str, Any]:
    """The data options as config overrides (``--set`` still wins: it is applied after)."""
    pairs = {
        "data.source": source,
        "data.store.settings": str(store_settings) if store_settings else None,
        "data.store.uids": str(uids) if uids else None,
        "data.store.query_modality": query_modality,
        "data.store.query_dates": query_dates,
    }
    overrides = {k: v for k, v in pairs.items() if v is not None}
    if set(overrides) - {"data.source"} and source != "store":
        raise typer.BadParameter("--store-settings/--uids/--query-* need --source store", param_hint="--source")
    return overrides


def _run(
    train: Callable[..., dict[str, Any]],
    config: Path,
    out: Path,
    register: bool,
    sets: list[str],
    data: dict[str, Any],
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.from_yaml(config, **{**data, **parse_overrides(sets)})
    report = train(cfg, out, register=register)
    summary = {
        "test": report["test"],
        "data": report.get("data"),
        "staged": report["staged"],
        "registered": report.get("registered"),
    }
    typer.echo(json.dumps(summary, indent=2, default=float))


@app.command()
def cxr(
    config: Annotated[Path, typer.Option(help="training config")] = Path("configs/training/cxr_triage.yaml"),
    out: OutOpt = None,
    register: RegisterOpt = False,
    source: SourceOpt = None,
    store_settings: StoreSettingsOpt = None,
    uids: UidsOpt = None,
    query_modality: QueryModalityOpt = None,
    query_dates: QueryDatesOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the chest radiograph triage model, export it with the parity gate and stage a version."""
    from training.train_cxr import train

    data = data_overrides(source, store_settings, uids, query_modality, query_dates)
    _run(train, config, out or Path("var/train/cxr"), register, set_ or [], data)


@app.command()
def polyp(
    config: Annotated[Path, typer.Option(help="training config")] = Path("configs/training/endoscopy_polyp.yaml"),
    out: OutOpt = None,
    register: RegisterOpt = False,
    source: SourceOpt = None,
    store_settings: StoreSettingsOpt = None,
    uids: UidsOpt = None,
    query_modality: QueryModalityOpt = None,
    query_dates: QueryDatesOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the endoscopy polyp model, export it with the parity gate and stage a version."""
    from training.train_polyp import train

    data = data_overrides(source, store_settings, uids, query_modality, query_dates)
    _run(train, config, out or Path("var/train/polyp"), register, set_ or [], data)


if __name__ == "__main__":
    app()
