"""The model registry on disk: ``models/registry/<model-id>/<version>/manifest.yaml``.

Versions sit side by side and are never overwritten. Which version serves is chosen by
configuration (``latest`` by default: the highest semver).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from models.errors import DxAssistError, ManifestError, ModelIntegrityError, PinnedVersionMismatch, VersionExists
from models.manifest import LoadedManifest, load_manifest, verify_artifact

#: ``models/registry`` of this checkout, unless ``DXASSIST_REGISTRY`` names another folder.
REGISTRY_ROOT: Final = Path(os.environ.get("DXASSIST_REGISTRY") or Path(__file__).resolve().parent / "registry")


def _semver_key(version: str) -> tuple[int, int, int, str]:
    core, _, pre = version.partition("-")
    major, minor, patch = (int(p) for p in core.split("."))
    # a release sorts after its pre-releases
    return major, minor, patch, pre or "~"


@dataclass(frozen=True)
class RegistryEntry:
    model_id: str
    version: str
    path: Path


def list_versions(root: Path = REGISTRY_ROOT) -> list[RegistryEntry]:
    """Every registered id@version (manifest present), sorted by id then semver."""
    entries = []
    if root.is_dir():
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for version_dir in model_dir.iterdir():
                if (version_dir / "manifest.yaml").is_file() and not version_dir.name.endswith(".partial"):
                    entries.append(RegistryEntry(model_dir.name, version_dir.name, version_dir))
    return sorted(entries, key=lambda e: (e.model_id, _semver_key(e.version)))


def resolve(model_id: str, version: str = "latest", root: Path = REGISTRY_ROOT) -> LoadedManifest:
    """The manifest of ``model_id`` at ``version`` (``latest`` = highest semver).

    Raises:
        ManifestError: no such model or version; or the folder and manifest disagree.
    """
    candidates = [e for e in list_versions(root) if e.model_id == model_id]
    if not candidates:
        raise ManifestError(f"model {model_id!r} is not registered")
    if version == "latest":
        entry = candidates[-1]
    else:
        match = [e for e in candidates if e.version == version]
        if not match:
            raise ManifestError(f"{model_id}@{version} is not registered")
        entry = match[0]
    loaded = load_manifest(entry.path)
    if loaded.manifest.id != entry.model_id or loaded.manifest.version != entry.version:
        raise ManifestError(f"{entry.model_id}/{entry.version}: folder does not match manifest id/version")
    return loaded


@dataclass(frozen=True)
class VerifyReport:
    ref: str
    ok: bool
    detail: str


def verify_all(root: Path = REGISTRY_ROOT) -> list[VerifyReport]:
    """Check every registered version's manifest and artifact checksum."""
    reports = []
    for entry in list_versions(root):
        ref = f"{entry.model_id}@{entry.version}"
        try:
            loaded = load_manifest(entry.path)
            verify_artifact(loaded)
            reports.append(VerifyReport(ref, True, f"sha256 {loaded.manifest.artifact.sha256[:12]}... ok"))
        except DxAssistError as exc:
            reports.append(VerifyReport(ref, False, str(exc)))
    return reports


def register_version(staged_dir: Path, root: Path = REGISTRY_ROOT) -> Path:
    """Copy a verified staged folder (manifest + artifact + model card) into the registry.

    The copy lands in ``<version>.partial`` and is renamed only after its checksum verifies.

    Raises:
        VersionExists: that version is already there (thresholds change only with a version).
        ModelIntegrityError / ManifestError: the staged folder does not verify.
    """
    loaded = load_manifest(staged_dir)
    verify_artifact(loaded)
    target = root / loaded.manifest.id / loaded.manifest.version
    if target.exists():
        raise VersionExists(f"{loaded.manifest.ref} is already registered; bump the version")
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(staged_dir, tmp)
    verify_artifact(load_manifest(tmp))
    tmp.rename(target)
    return target


@dataclass(frozen=True)
class Pin:
    """One model version exactly: what a deployment resolved ``latest`` to, and its digests."""

    model_id: str
    version: str
    manifest_sha256: str
    artifact_sha256: str


def pin(model_id: str, version: str = "latest", root: Path = REGISTRY_ROOT) -> Pin:
    """Resolve ``version`` (``latest`` included) here, verify the artifact, and name it exactly.

    Raises:
        ManifestError / ModelIntegrityError: as ``resolve`` and ``verify_artifact``.
    """
    loaded = resolve(model_id, version, root)
    verify_artifact(loaded)
    return Pin(model_id, loaded.manifest.version, loaded.manifest_sha256, loaded.manifest.artifact.sha256)


def resolve_pinned(wanted: Pin, root: Path = REGISTRY_ROOT) -> LoadedManifest:
    """This registry's copy of exactly ``wanted``: same version, same manifest, same artifact.

    Raises:
        PinnedVersionMismatch: the version is not registered here, or its manifest or artifact
            differs from what was pinned (never another version in its place).
    """
    ref = f"{wanted.model_id}@{wanted.version}"
    try:
        loaded = resolve(wanted.model_id, wanted.version, root)
    except ManifestError as exc:
        raise PinnedVersionMismatch(
            f"{ref} was pinned by the deployment but this node's registry cannot provide it ({exc}); "
            "register that exact version here, or deploy from a registry this node shares"
        ) from None
    if loaded.manifest_sha256 != wanted.manifest_sha256:
        raise PinnedVersionMismatch(
            f"{ref}: this node's manifest (sha256 {loaded.manifest_sha256[:12]}...) is not the one the "
            f"deployment pinned ({wanted.manifest_sha256[:12]}...)"
        )
    if loaded.manifest.artifact.sha256 != wanted.artifact_sha256:
        raise PinnedVersionMismatch(f"{ref}: this node's manifest names another artifact than the pinned one")
    try:
        verify_artifact(loaded)
    except ModelIntegrityError as exc:
        raise PinnedVersionMismatch(f"{ref}: this node's copy does not verify ({exc})") from None
    return loaded
