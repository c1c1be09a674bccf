"""``data.source: store``: labelled studies pulled from the site's DICOM store for training.

Runs ``dxassist export`` (``serving/export``, ADR 0018) as a subprocess, the same command a site
runs by hand: studies are fetched through the configured ``StudySource``, de-identified on the
way (Basic Profile allow-list, pseudonyms, shifted dates), labelled from their screenings with
readers' feedback applied, and written in the layout training reads. Training never imports
serving (and serving never imports torch): the command line is the boundary.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

from models.errors import SourceError
from training.config import StoreExportConfig
from training.provenance import export_report

logger = logging.getLogger("training.store_export")


def export_from_store(store: StoreExportConfig, out: Path, *, layout: str) -> Path:
    """Export into ``out`` (emptied first: it is this run's own folder) and return it.

    Raises:
        SourceError: nothing named to export, or the export failed or exported nothing.
    """
    if store.uids is None and not (store.query_modality or store.query_dates):
        raise SourceError("data.store: give uids (a file of Study UIDs) or query_modality/query_dates")
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "serving.cli.main", "export", "--out", str(out), "--layout", layout]
    if store.uids is not None:
        argv += ["--uids", str(store.uids)]
    if store.query_modality:
        argv += ["--query-modality", store.query_modality]
    if store.query_dates:
        argv += ["--query-dates", store.query_dates]
    if store.settings is not None:
        argv += ["--settings", str(store.settings)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    # the command prints counts and reasons, never identifiers (ADR 0005)
    message = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0 or export_report(out) is None:
        raise SourceError(f"dxassist export failed (exit {done.returncode}): {message[-1] if message else ''}")
    logger.info("store export: %s", message[-1] if message else "done")
    return out
