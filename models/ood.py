"""Out-of-distribution gate: does this image look like anything the model was trained on?

The network exports pooled statistics of intermediate feature maps as an extra output (role
``features``). The training pipeline fits a Gaussian to those features on the model's own
training images and ships it as a small second artifact (``ood.npz``, sha256 in the
manifest's ``ood:`` block). At run time the gate measures the Mahalanobis distance of each
frame's features to that Gaussian; above the manifest's threshold (chosen on the validation
split for a stated in-distribution acceptance) the frame gets no finding.

Why this form: Mahalanobis distance on intermediate features is the measured standard for
"wrong anatomy / wrong modality / not a chest X-ray" on radiograph classifiers, needs no OOD
examples to fit, costs a matrix-vector product per frame, and is refitted whenever a site
retrains the model on its own studies, so a model trained on their data accepts their data.

The covariance is estimated on standardised features with Ledoit-Wolf shrinkage (there are
more feature dimensions than training images) and stored as its leading eigenvectors plus one
shared variance for the remaining directions, so the distance over the full space costs
``D x k`` numbers instead of ``D x D``.

numpy only: serving imports this module, never torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.errors import ModelIntegrityError
from models.manifest import LoadedManifest, file_sha256

#: array names inside ``ood.npz``; nothing else is read (``allow_pickle=False``)
_KEYS: Final = ("mean", "scale", "components", "inv_eigenvalues", "inv_residual")
#: largest stats file loaded at all
MAX_STATS_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class GaussianStats:
    """A Gaussian over ``D`` features: mean, per-feature scale, ``k`` principal directions.

    ``components`` is ``(D, k)`` orthonormal; ``inv_eigenvalues`` ``(k,)`` are the inverse
    (shrunk) variances along them; ``inv_residual`` the inverse variance of every other direction.
    """

    mean: NDArray[np.float64]
    scale: NDArray[np.float64]
    components: NDArray[np.float64]
    inv_eigenvalues: NDArray[np.float64]
    inv_residual: float

    def __post_init__(self) -> None:
        # the projection in float32: the distance needs no more precision, and it halves the work
        object.__setattr__(self, "_components32", np.ascontiguousarray(self.components, dtype=np.float32))

    @property
    def dimensions(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, features: NDArray[np.floating]) -> NDArray[np.float64]:
        """Mahalanobis distance of each row of ``(N, D)`` features (``sqrt`` of the quadratic form)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dimensions:
            raise ValueError(f"features of shape {x.shape} do not fit a {self.dimensions}-dimensional gate")
        z = (x - self.mean) / self.scale
        # einsum's own loop, not BLAS: a threaded BLAS call right after an ONNX Runtime run waits
        # for its threads on a busy CPU (measured 5 ms against 0.1 ms for one frame)
        proj = np.einsum("nd,dk->nk", z.astype(np.float32), self._components32).astype(np.float64)  # type: ignore[attr-defined]
        inside = (proj**2) @ self.inv_eigenvalues
        residual = np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0) * self.inv_residual
        d2 = inside + residual
        out: NDArray[np.float64] = np.sqrt(np.where(np.isfinite(d2), d2, np.inf))
        return out

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            components=self.components.astype(np.float32),
            inv_eigenvalues=self.inv_eigenvalues.astype(np.float32),
            inv_residual=np.array([self.inv_residual], np.float64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> GaussianStats:
        """Parse an ``ood.npz``; ``ValueError`` for anything but the five expected arrays."""
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            if sorted(data.files) != sorted(_KEYS):
                raise ValueError("stats file must hold exactly " + ", ".join(_KEYS))
            arrays = {k: np.asarray(data[k], dtype=np.float64) for k in _KEYS}
        d = arrays["mean"].shape
        comps = arrays["components"]
        if (
            len(d) != 1
            or arrays["scale"].shape != d
            or comps.ndim != 2
            or comps.shape[0] != d[0]
            or arrays["inv_eigenvalues"].shape != (comps.shape[1],)
            or arrays["inv_residual"].shape != (1,)
        ):
            raise ValueError("stats arrays have inconsistent shapes")
        if not all(np.isfinite(a).all() for a in arrays.values()) or (arrays["scale"] <= 0).any():
            raise ValueError("stats arrays must be finite with positive scales")
        return cls(
            mean=arrays["mean"],
            scale=arrays["scale"],
            components=comps,
            inv_eigenvalues=arrays["inv_eigenvalues"],
            inv_residual=float(arrays["inv_residual"][0]),
        )


def ledoit_wolf_shrinkage(z: NDArray[np.float64]) -> float:
    """Ledoit-Wolf optimal shrinkage intensity towards ``mu * I`` for centred rows ``z``.

    Uses ``sum_i ||z_i z_i^T - S||_F^2 = sum_i ||z_i||^4 - n ||S||_F^2`` and the Gram matrix
    (``||S||_F^2 = ||Z Z^T||_F^2 / n^2``), so the ``D x D`` covariance is never formed.
    """
    n, p = z.shape
    gram = z @ z.T
    s_frob2 = float((gram**2).sum()) / n**2
    mu = float(np.trace(gram)) / n / p
    delta2 = (s_frob2 - 2 * mu * float(np.trace(gram)) / n + p * mu**2) / p
    row4 = float(((z**2).sum(axis=1) ** 2).sum())
    beta2 = min((row4 - n * s_frob2) / n**2 / p, delta2)
    return float(np.clip(beta2 / delta2, 0.0, 1.0)) if delta2 > 0 else 1.0


def fit_gaussian(features: NDArray[np.floating], *, components: int = 256) -> GaussianStats:
    """Fit the gate's Gaussian to in-distribution features ``(N, D)`` (training images).

    Features are standardised per dimension, the covariance shrunk with Ledoit-Wolf, and its
    leading ``components`` eigen-directions kept exactly; the rest share their mean variance.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 8:
        raise ValueError("need at least 8 feature rows to fit a Gaussian")
    if not np.isfinite(x).all():
        raise ValueError("features contain non-finite values")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-6 * max(float(scale.max()), 1e-12), scale, max(float(scale.max()), 1.0))
    z = (x - mean) / scale
    n, p = z.shape
    alpha = ledoit_wolf_shrinkage(z)
    _, singular, vt = np.linalg.svd(z, full_matrices=False)
    eig = singular**2 / n  # sample covariance eigenvalues (at most min(n, p) non-zero)
    total = float(eig.sum())  # trace of the sample covariance
    mu = total / p
    k = int(min(components, len(eig), p - 1))
    kept = (1 - alpha) * eig[:k] + alpha * mu
    rest = (1 - alpha) * (total - float(eig[:k].sum())) / max(p - k, 1) + alpha * mu
    return GaussianStats(
        mean=mean,
        scale=scale,
        components=vt[:k].T.copy(),
        inv_eigenvalues=1.0 / kept,
        inv_residual=1.0 / max(rest, 1e-12),
    )


def threshold_for_acceptance(distances: NDArray[np.floating], acceptance: float) -> float:
    """Smallest distance limit that accepts at least ``acceptance`` of in-distribution ``distances``."""
    d = np.sort(np.asarray(distances, dtype=np.float64))
    if len(d) == 0 or not 0 < acceptance <= 1:
        raise ValueError("need distances and an acceptance in (0, 1]")
    index = min(len(d) - 1, int(np.ceil(acceptance * len(d))) - 1)
    return float(d[max(index, 0)])


@dataclass(frozen=True)
class OodDecision:
    """The gate's verdict on one image's frames."""

    distances: NDArray[np.float64]
    threshold: float

    @property
    def accepted(self) -> NDArray[np.bool_]:
        out: NDArray[np.bool_] = self.distances <= self.threshold
        return out


class OodGate:
    """The verified gate of one model version (stats checked against the manifest's sha256)."""

    def __init__(self, loaded: LoadedManifest) -> None:
        spec = loaded.manifest.ood
        if spec is None:
            raise ValueError(f"{loaded.manifest.ref} declares no ood gate")
        self.ref = loaded.manifest.ref
        self.threshold = spec.threshold
        self.features_output = spec.features_output
        path = verify_ood_stats(loaded)
        try:
            self.stats = GaussianStats.from_bytes(path.read_bytes())
        except (ValueError, OSError, KeyError) as exc:
            raise ModelIntegrityError(f"{self.ref}: ood stats file is unusable ({type(exc).__name__})") from exc
        features = loaded.manifest.output_by_name(spec.features_output)
        if features is None or features.shape[1] != self.stats.dimensions:
            raise ModelIntegrityError(f"{self.ref}: ood stats do not match the features output")

    @classmethod
    def of(cls, loaded: LoadedManifest) -> OodGate | None:
        """The gate when the manifest declares one, else ``None`` (a version without a gate)."""
        return cls(loaded) if loaded.manifest.ood is not None else None

    def decide(self, features: NDArray[np.floating]) -> OodDecision:
        return OodDecision(distances=self.stats.distances(features), threshold=self.threshold)


def verify_ood_stats(loaded: LoadedManifest) -> Path:
    """Check that the stats file sits beside the manifest and matches its sha256."""
    spec = loaded.manifest.ood
    ref = loaded.manifest.ref
    if spec is None:
        raise ModelIntegrityError(f"{ref}: no ood block")
    path = loaded.directory / spec.stats_file
    resolved = path.resolve()
    if resolved.parent != loaded.directory or path.is_symlink():
        raise ModelIntegrityError(f"{ref}: ood stats must be a regular file beside the manifest")
    if not resolved.is_file():
        raise ModelIntegrityError(f"{ref}: ood stats {spec.stats_file} is missing")
    if resolved.stat().st_size > MAX_STATS_BYTES:
        raise ModelIntegrityError(f"{ref}: ood stats file is larger than {MAX_STATS_BYTES} bytes")
    actual = file_sha256(resolved)
    if actual != spec.stats_sha256:
        raise ModelIntegrityError(
            f"{ref}: ood stats sha256 {actual[:12]}... does not match manifest {spec.stats_sha256[:12]}..."
        )
    return resolved
