"""The embedded default study source: a folder of DICOM files, indexed by Study Instance UID.

Files are found recursively (``*.dcm`` and extension-less files). The index reads headers only
and remembers each file's size and mtime, so a rescan re-reads only what changed. Files that
are not DICOM are listed as such, never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from models.decode import study_uid_of
from models.errors import StudyNotFound
from serving.core.screening import InstanceInput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexedFile:
    path: Path
    study_instance_uid: str  # "" when the file could not be read
    size: int
    mtime_ns: int


def candidate_files(root: Path) -> list[Path]:
    """DICOM candidates below ``root``: ``*.dcm`` or no extension; sorted for stable output."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix.lower() == ".dcm" or p.suffix == ""))


class LocalFolderSource:
    """A folder as a DICOM store (read side)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index: dict[Path, IndexedFile] = {}

    def rescan(self) -> None:
        seen = set()
        for path in candidate_files(self.root):
            stat = path.stat()
            seen.add(path)
            old = self._index.get(path)
            if old and old.size == stat.st_size and old.mtime_ns == stat.st_mtime_ns:
                continue
            uid = study_uid_of(path)  # "" for a file that cannot be read; never raises
            self._index[path] = IndexedFile(path, uid, stat.st_size, stat.st_mtime_ns)
        for gone in set(self._index) - seen:
            del self._index[gone]

    def studies(self) -> dict[str, list[Path]]:
        """Study Instance UID -> its files (unreadable files are under ``""``)."""
        self.rescan()
        out: dict[str, list[Path]] = {}
        for entry in self._index.values():
            out.setdefault(entry.study_instance_uid, []).append(entry.path)
        return {k: sorted(v) for k, v in out.items()}

    def files(self, study_instance_uid: str) -> list[Path]:
        """Files of one study. Raises ``StudyNotFound`` (message carries no UID)."""
        files = self.studies().get(study_instance_uid)
        if not study_instance_uid or not files:
            raise StudyNotFound("study not found in the local store")
        return files

    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        return [InstanceInput(p, str(p.relative_to(self.root))) for p in self.files(study_instance_uid)]
