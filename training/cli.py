"""The training command line, on typer like ``dxassist``: ``python -m training.cli cxr|polyp``.

``--set KEY=VALUE`` overrides one field of the training config (``data.n_train=64``,
``train.bf16=false``); each value is read as a YAML scalar or list, then the whole config is
validated by ``TrainConfig``, so a typo or a wrong type fails before any training starts.
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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs to a mapping; values are YAML scalars/lists (``true``, ``64``, ``[1, 2]``, ``tiny``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def _run(train: Callable[..., dict[str, Any]], config: Path, out: Path, register: bool, sets: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.from_yaml(config, **parse_overrides(sets))
    report = train(cfg, out, register=register)
    summary = {"test": report["test"], "staged": report["staged"], "registered": report.get("registered")}
    typer.echo(json.dumps(summary, indent=2, default=float))


@app.command()
def cxr(
    config: Annotated[Path, typer.Option(help="training config")] = Path("configs/training/cxr_triage.yaml"),
    out: OutOpt = None,
    register: RegisterOpt = False,
    set_: SetOpt = None,
) -> None:
    """Train the chest radiograph triage model, export it with the parity gate and stage a version."""
    from training.train_cxr import train

    _run(train, config, out or Path("var/train/cxr"), register, set_ or [])


@app.command()
def polyp(
    config: Annotated[Path, typer.Option(help="training config")] = Path("configs/training/endoscopy_polyp.yaml"),
    out: OutOpt = None,
    register: RegisterOpt = False,
    set_: SetOpt = None,
) -> None:
    """Train the endoscopy polyp model, export it with the parity gate and stage a version."""
    from training.train_polyp import train

    _run(train, config, out or Path("var/train/polyp"), register, set_ or [])


if __name__ == "__main__":
    app()
