"""Model versions shipped by the driver of a batch job, never looked up on the worker's disk.

The driver resolves each configured model once (``latest`` becomes one exact version), reads the
files the manifest names (the manifest, the ONNX artifact, the out-of-distribution statistics),
checks them against the manifest's sha256 and puts them in Ray's object store. Every actor, on
any node, unpacks them into a private temporary folder, checks the manifest's own digest against
the driver's and the artifact's against the manifest (``models.manifest.verify_artifact``, the
same check as a registry load), opens its sessions and removes the folder. A node with another
version, or with no registry at all, therefore screens with exactly the version the driver
resolved, and refuses (``ModelIntegrityError``) rather than screening with another one
(ADR 0020).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelIntegrityError
from models.manifest import LoadedManifest, load_manifest, verify_artifact


@dataclass(frozen=True)
class ShippedModel:
    """One model version as bytes: what the driver resolved, for any node to load."""

    ref: str  # id@version
    manifest_sha256: str
    artifact_sha256: str
    files: dict[str, bytes]  # file name (no folder) -> content: manifest.yaml, artifact, ood stats

    @property
    def identity(self) -> str:
        """``id@version sha256:<artifact>``: what a result's version claim is checked against."""
        return f"{self.ref} sha256:{self.artifact_sha256}"


def identity_of(loaded: LoadedManifest) -> str:
    return f"{loaded.manifest.ref} sha256:{loaded.manifest.artifact.sha256}"


def pack(loaded: LoadedManifest) -> ShippedModel:
    """Read a resolved version's files into memory, each checked against the manifest.

    Raises:
        ModelIntegrityError: a file changed since the manifest was read, or does not match it.
    """
    manifest = loaded.manifest
    names = ["manifest.yaml", manifest.artifact.file]
    if manifest.ood is not None:
        names.append(manifest.ood.stats_file)
    verify_artifact(loaded)  # regular files beside the manifest, digests as declared
    files = {name: (loaded.directory / name).read_bytes() for name in names}
    if hashlib.sha256(files["manifest.yaml"]).hexdigest() != loaded.manifest_sha256:
        raise ModelIntegrityError(f"{manifest.ref}: the manifest changed while the job was starting")
    if hashlib.sha256(files[manifest.artifact.file]).hexdigest() != manifest.artifact.sha256:
        raise ModelIntegrityError(f"{manifest.ref}: the artifact changed while the job was starting")
    return ShippedModel(manifest.ref, loaded.manifest_sha256, manifest.artifact.sha256, files)


@contextmanager
def unpacked(shipped: list[ShippedModel]) -> Iterator[list[LoadedManifest]]:
    """The shipped versions as verified ``LoadedManifest`` in a private folder, removed on exit
    (open the ONNX sessions and the gates inside the block: they read the files once).

    Raises:
        ModelIntegrityError: a file name is not a plain name, the manifest is not the driver's,
            or the artifact does not match the manifest.
    """
    root = Path(tempfile.mkdtemp(prefix="dxassist-shipped-"))
    try:
        loaded = []
        for n, model in enumerate(shipped):
            folder = root / str(n)
            folder.mkdir()
            for name, data in model.files.items():
                if Path(name).name != name or name in ("", ".", ".."):
                    raise ModelIntegrityError(f"{model.ref}: shipped file name is not a plain name")
                (folder / name).write_bytes(data)
            one = load_manifest(folder)
            if one.manifest_sha256 != model.manifest_sha256 or one.manifest.ref != model.ref:
                raise ModelIntegrityError(f"{model.ref}: the shipped manifest is not the one the driver resolved")
            verify_artifact(one)
            loaded.append(one)
        yield loaded
    finally:
        shutil.rmtree(root, ignore_errors=True)
