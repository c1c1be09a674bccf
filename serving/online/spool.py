"""The upload spool: where an upload is held while it streams in, and a pushed study while the
C-STORE SCP receives it.

An upload stays in memory while every upload being received fits ``api.upload_memory_bytes``
(``MemoryBudget``): it is parsed as it arrives and never written to disk only to be read back.
Past that budget it goes on in a private folder (0700) of private files (0600), local to one
node. Neither stays once admitted: ``ScreeningService`` screens it at once or moves the
instances into the results database with their job (``uploads``; ADR 0021, 0026). The SCP's
folders are its durable receiving area until a study is stable.

An upload is written under a ``.partial-`` name and renamed when complete, so a crash mid-upload
leaves only partial folders, which ``sweep_partials`` removes at the next start.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass, field
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


class MemoryBudget:
    """Bytes of uploads held in memory at once, across requests (one per service)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes if they fit (True), else nothing changes (False)."""
        with self._lock:
            if self._held + n > self.limit_bytes:
                return False
            self._held += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self._held = max(0, self._held - n)

    @property
    def held(self) -> int:
        return self._held


@dataclass
class SpooledUpload:
    """The files of one upload as received: in memory (``parts``, counted against ``budget``)
    or in a private spool ``folder``. ``files()`` reads them; ``discard()`` lets them go."""

    parts: list[bytes] = field(default_factory=list)
    folder: Path | None = None
    budget: MemoryBudget | None = None
    held: int = 0

    @property
    def count(self) -> int:
        return len(self.parts) if self.folder is None else len(list(self.folder.glob("*.dcm")))

    def files(self) -> tuple[bytes, ...]:
        if self.folder is None:
            return tuple(self.parts)
        return tuple(path.read_bytes() for path in sorted(self.folder.glob("*.dcm")))

    def discard(self) -> None:
        """Remove the folder, or hand the memory back to the budget (callable twice)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.parts, self.held = [], 0


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
