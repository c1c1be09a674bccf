"""The upload spool: private folders (0700) of private files (0600), local to one node, that hold
an upload while it streams in and a pushed study while the C-STORE SCP receives it.

Neither stays here once admitted: ``ScreeningService`` moves the instances into the results
database with their job (``uploads``; ADR 0021), where every replica on every node reads them,
and removes the folder. The spool is only the streaming buffer of one request (an upload is
parsed as it arrives, never held whole while it is read off the socket) and the SCP's durable
receiving area until a study is stable.

An upload is written under a ``.partial-`` name and renamed when complete, so a crash mid-upload
leaves only partial folders, which ``sweep_partials`` removes at the next start.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: the prefix of the spool folders an upload is written into until it is complete
PARTIAL_PREFIX = ".partial-"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by this user only (never replaces an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def sweep_partials(spool_dir: Path) -> int:
    """Remove uploads a previous process left half-written; returns how many."""
    if not spool_dir.is_dir():
        return 0
    removed = 0
    for child in spool_dir.iterdir():
        if child.name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
    return removed
