"""The lifecycle tables (serving.persistence.lifecycle) agree with migration 0006 on SQLite and
PostgreSQL, a switch and its audit row are one transaction, and a switch without who or why is
refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import ResultsConflict
from serving.persistence.lifecycle import LifecycleStore
from tests.integration.conftest import postgres, results_db  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def test_lifecycle_tables_come_from_the_migration(results_db: Path | str) -> None:  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from serving.persistence.database import Database
    from serving.persistence.schema import metadata

    LifecycleStore(results_db).close()
    db = Database(results_db)
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False})
        drift = compare_metadata(context, metadata)
    dialect = db.dialect
    db.close()
    flat = [d for group in drift for d in (group if isinstance(group, list) else [group])]
    mine = {"model_active_versions", "model_version_events", "model_shadow_versions", "shadow_results"}
    assert mine <= set(metadata.tables)  # declared with the rest of the schema
    real = [
        d
        for d in flat
        if d[0] not in ("add_index", "remove_index")  # indexes are the migration's alone
        and (d[1].name if d[0] in ("add_table", "remove_table") else d[2]) in mine
        and not (dialect == "sqlite" and d[0] == "modify_default")
    ]
    assert real == []


def test_switch_is_audited_and_needs_who_and_why(tmp_path: Path) -> None:
    store = LifecycleStore(tmp_path / "r.sqlite3")
    with pytest.raises(ResultsConflict):
        store.switch("cxr-triage", "1.0.1", action="promote", actor=" ", reason="x", current="1.0.0")
    assert store.active_versions() == {} and store.events() == []
    store.switch("cxr-triage", "1.0.1", action="promote", actor="a", reason="r", current="1.0.0")
    store.switch("cxr-triage", "1.0.2", action="promote", actor="b", reason="s", current="ignored: the database knows")
    assert store.active_versions() == {"cxr-triage": "1.0.2"}
    assert [(e.from_version, e.to_version) for e in store.events("cxr-triage")] == [
        ("1.0.0", "1.0.1"),
        ("1.0.1", "1.0.2"),
    ]
    store.close()
