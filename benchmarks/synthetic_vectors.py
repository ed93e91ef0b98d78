"""Synthetic embeddings with the structure of real ones, for index tests and benchmarks at scales
the real corpus does not reach.

Isotropic noise is the wrong stand-in: in high dimension all its points are nearly equidistant,
no approximate index works on it, and no real embedding looks like it. Instead a mixture is fitted
to real embeddings (e.g. MiniLM vectors of the shared PubMed abstracts):

1. PCA: the mean and the top ``subspace`` principal directions;
2. k-means with ``clusters`` centres in that subspace; per cluster a diagonal Gaussian (its own
   spread along each direction, shrunk towards the global spread for small clusters);
3. outside the subspace, isotropic noise with the variance the real residual has, so the
   synthetic vectors keep the real data's energy outside the top directions.

Samples are L2-normalised like the real embeddings. Fitted parameters save to a ``.npz``
(no pickle) so a run can be repeated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from scipy.cluster.vq import kmeans2

FloatArray = npt.NDArray[np.float32]

# A cluster with n members keeps n / (n + SHRINK) of its own variance estimate.
SHRINK = 20.0


@dataclass(frozen=True)
class EmbeddingMixture:
    mean: FloatArray  # (d,)
    basis: FloatArray  # (subspace, d), orthonormal rows
    centres: FloatArray  # (clusters, subspace)
    scales: FloatArray  # (clusters, subspace) standard deviations
    weights: npt.NDArray[np.float64]  # (clusters,)
    residual_std: float
    explained_variance: float  # share of the real variance inside the subspace

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls, embeddings: npt.ArrayLike, *, subspace: int = 128, clusters: int = 64, seed: int = 0
    ) -> EmbeddingMixture:
        data = np.asarray(embeddings, dtype=np.float64)
        n, dim = data.shape
        subspace = max(1, min(subspace, dim - 1, n - 1))
        clusters = max(1, min(clusters, n // 8))
        mean = data.mean(axis=0)
        centred = data - mean
        _, singular, components = np.linalg.svd(centred, full_matrices=False)
        basis = components[:subspace]
        coords = centred @ basis.T
        residual = centred - coords @ basis
        residual_std = float(np.sqrt((residual**2).sum(axis=1).mean() / (dim - subspace)))
        energy = singular**2
        # scipy's k-means, not faiss.Kmeans: once pymupdf is imported, SWIG hands faiss's
        # std::vector<float> results to pymupdf's proxy class and faiss.Kmeans fails.
        centroids, assigned = kmeans2(coords, clusters, iter=25, minit="++", seed=seed)
        centres, scales, weights = _cluster_gaussians(
            coords, assigned.astype(np.int64), centroids.astype(np.float32)
        )
        return cls(
            mean=mean.astype(np.float32),
            basis=basis.astype(np.float32),
            centres=centres,
            scales=scales,
            weights=weights,
            residual_std=residual_std,
            explained_variance=float(energy[:subspace].sum() / energy.sum()),
        )

    def sample(self, n: int, *, seed: int, batch: int = 65_536) -> FloatArray:
        """``n`` unit vectors drawn from the mixture (deterministic for a given seed)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            size = stop - start
            which = rng.choice(len(self.weights), size=size, p=self.weights)
            noise = rng.standard_normal((size, self.basis.shape[0]), dtype=np.float32)
            coords = self.centres[which] + noise * self.scales[which]
            residual = rng.standard_normal((size, self.dim), dtype=np.float32)
            block = self.mean + coords @ self.basis + self.residual_std * residual
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "PCA-subspace Gaussian cluster mixture + fitted isotropic residual",
            "dim": self.dim,
            "subspace": int(self.basis.shape[0]),
            "clusters": len(self.weights),
            "explained_variance": round(self.explained_variance, 4),
            "residual_std": round(self.residual_std, 6),
        }

    def save(self, path: Path | IO[bytes]) -> None:
        np.savez(
            path,
            mean=self.mean,
            basis=self.basis,
            centres=self.centres,
            scales=self.scales,
            weights=self.weights,
            residual_std=np.float64(self.residual_std),
            explained_variance=np.float64(self.explained_variance),
        )

    @classmethod
    def load(cls, path: Path) -> EmbeddingMixture:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                mean=data["mean"],
                basis=data["basis"],
                centres=data["centres"],
                scales=data["scales"],
                weights=data["weights"],
                residual_std=float(data["residual_std"]),
                explained_variance=float(data["explained_variance"]),
            )


def _cluster_gaussians(
    coords: npt.NDArray[np.float64], assigned: npt.NDArray[np.int64], centroids: FloatArray
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.float64]]:
    global_var = coords.var(axis=0)
    centres, scales, counts = [], [], []
    for cluster in range(len(centroids)):
        members = coords[assigned == cluster]
        count = len(members)
        centre = members.mean(axis=0) if count else centroids[cluster]
        own_var = members.var(axis=0) if count > 1 else global_var
        keep = count / (count + SHRINK)
        # Small clusters borrow spread from the whole subspace (half of it: a cluster is
        # tighter than the corpus it sits in).
        scales.append(np.sqrt(keep * own_var + (1 - keep) * 0.5 * global_var))
        centres.append(centre)
        counts.append(max(count, 1))
    weights = np.asarray(counts, dtype=np.float64)
    return (
        np.asarray(centres, dtype=np.float32),
        np.asarray(scales, dtype=np.float32),
        weights / weights.sum(),
    )
