"""What every ``dxassist`` sub-command shares: the ``--settings`` option and loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from serving.settings import Settings

SettingsOpt = Annotated[
    Path | None, typer.Option("--settings", help="settings YAML (default configs/settings/dev.yaml)")
]


def load_settings(path: Path | None, console: Console) -> Settings:
    """The settings, or exit 2 with the reason (which never quotes a value: ``describe_errors``)."""
    try:
        return Settings.load(path)
    except (OSError, ValueError) as exc:
        console.print(f"[red]settings error:[/red] {exc}")
        raise typer.Exit(2) from exc
