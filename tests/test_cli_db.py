"""``dxassist db upgrade|current`` on a SQLite results database (PostgreSQL: the same code path,
covered by tests/integration/test_results_database.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml
from typer.testing import CliRunner

from serving.cli.main import app
from serving.persistence.migrate import head_revision

runner = CliRunner()


def said(result: object) -> str:
    """The output as one line (the console wraps long paths)."""
    return " ".join(str(result.output).split())  # type: ignore[attr-defined]


def settings_for(tmp_path: Path) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    return path


def test_db_current_and_upgrade_on_a_pre_migration_database(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    old = sqlite3.connect(tmp_path / "results.sqlite3")  # a table as the pre-migration code made it
    old.execute(
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, screening_id INTEGER NOT NULL,"
        " sink TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at TEXT NOT NULL,"
        " last_error TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, UNIQUE (screening_id, sink))"
    )
    old.commit()
    old.close()
    pending = runner.invoke(app, ["db", "current", "--settings", str(settings)])
    assert pending.exit_code == 1 and "pre-migration schema" in said(pending) and "upgrade pending" in said(pending)
    upgraded = runner.invoke(app, ["db", "upgrade", "--settings", str(settings)])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"the pre-migration schema -> revision {head_revision()}" in said(upgraded)
    current = runner.invoke(app, ["db", "current", "--settings", str(settings)])
    assert current.exit_code == 0 and f"revision {head_revision()}, head {head_revision()}: up to date" in said(current)


def test_db_upgrade_refuses_a_schema_newer_than_this_dxassist(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    assert runner.invoke(app, ["db", "upgrade", "--settings", str(settings)]).exit_code == 0
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.commit()
    db.close()
    current = runner.invoke(app, ["db", "current", "--settings", str(settings)])
    assert current.exit_code == 1 and "newer than this dxassist" in said(current)
    refused = runner.invoke(app, ["db", "upgrade", "--settings", str(settings)])
    assert refused.exit_code == 1 and "refused" in said(refused) and "9999" in said(refused)
