"""Comparing trained networks: representational geometry (linear CKA, SVCCA) and attractor topology.

Trajectory matrices are [samples, units]: every state of every trial, the same trials for every model, so
row i of two models' matrices is the same trial at the same step. Both similarities are invariant to an
orthogonal change of the units' basis and to scale, so two networks that solve the task the same way score
near 1 even when their units are permuted and mixed; independent activity scores near 0.

- linear CKA (Kornblith 2019): |Y'X|_F^2 / (|X'X|_F |Y'Y|_F) on centred X, Y.
- SVCCA (Raghu 2017, the seed's svcca_analysis.py): centre, keep the top singular directions (the seed keeps
  2; here as many as explain `variance` of each, at most `max_dims`), then the mean canonical correlation
  of the two reduced matrices. The seed's distance is 1 - that mean; so is ours.
- topology: a model's signature is its count of stable / saddle / unstable fixed points per input
  condition; the distance between two models is the L1 distance of their signatures (how many fixed points,
  by type and condition, one has that the other lacks), as the seed clusters models by their attractors.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

KINDS = ("stable", "saddle", "unstable")


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"a trajectory matrix is [samples, units]; got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True)


def _same_samples(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"the two matrices must hold the same samples (rows): {x.shape[0]} vs {y.shape[0]}")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    _same_samples(x, y)
    x, y = _centred(x), _centred(y)
    cross = np.linalg.norm(y.T @ x) ** 2
    norms = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norms) if norms > 0 else 0.0


def _top_directions(x: np.ndarray, variance: float, max_dims: int) -> np.ndarray:
    """The centred data projected on its top singular directions (enough for `variance`, <= max_dims)."""
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((x.shape[0], 0))
    explained = np.cumsum(s ** 2) / np.sum(s ** 2)
    keep = min(int(np.searchsorted(explained, variance) + 1), max_dims, int((s > s[0] * 1e-10).sum()))
    return u[:, :keep] * s[:keep]


def svcca_basis(x: np.ndarray, variance: float = 0.99, max_dims: int = 20) -> np.ndarray:
    """An orthonormal basis [samples, k] of x's top singular subspace: SVCCA's half that needs only x (a
    model's basis is computed once, not once per pair)."""
    reduced = _top_directions(_centred(x), variance, max_dims)
    return np.linalg.qr(reduced)[0] if reduced.shape[1] else reduced


def svcca_of_bases(qx: np.ndarray, qy: np.ndarray) -> float:
    """Mean canonical correlation of two subspaces: the singular values of Qx' Qy are the correlations."""
    _same_samples(qx, qy)
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return 0.0
    return float(np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0).mean())


def svcca(x: np.ndarray, y: np.ndarray, variance: float = 0.99, max_dims: int = 20) -> float:
    """Mean canonical correlation between the top singular subspaces of x and y (1 = the same geometry)."""
    _same_samples(x, y)
    return svcca_of_bases(svcca_basis(x, variance, max_dims), svcca_basis(y, variance, max_dims))


def pairwise(items: Sequence, similarity: Callable[[object, object], float]) -> np.ndarray:
    """A symmetric [n, n] distance matrix 1 - similarity, zero on the diagonal."""
    n = len(items)
    distance = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distance[i, j] = distance[j, i] = 1.0 - similarity(items[i], items[j])
    return distance


def topology_signature(counts: Sequence[dict[str, int]]) -> np.ndarray:
    """Per condition (in order) the number of stable, saddle and unstable fixed points, as one vector."""
    return np.array([c[kind] for c in counts for kind in KINDS], dtype=np.float64)


def topology_distances(signatures: Sequence[np.ndarray]) -> np.ndarray:
    sig = np.stack(signatures)
    return np.abs(sig[:, None, :] - sig[None, :, :]).sum(-1)


def grouping(distance: np.ndarray, labels: Sequence[str]) -> dict[str, float | None]:
    """How well a distance matrix groups models by label (the learning rule): `nearest_same` is the share of
    models whose nearest other model has their label (chance ~ the label's share); `silhouette` in [-1, 1]
    (None when it is undefined: a single label, or as many labels as models)."""
    from sklearn.metrics import silhouette_score

    labels = list(labels)
    n = len(labels)
    if n < 2:
        return {"nearest_same": None, "silhouette": None}
    masked = distance + np.diag(np.full(n, np.inf))
    nearest = masked.argmin(axis=1)
    same = float(np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]))
    distinct = len(set(labels))
    silhouette = None
    if 1 < distinct < n:
        silhouette = float(silhouette_score(distance, labels, metric="precomputed"))
    return {"nearest_same": same, "silhouette": silhouette}


def classical_mds(distance: np.ndarray, dims: int = 2) -> np.ndarray:
    """Torgerson MDS: the [n, dims] embedding whose Euclidean distances best match `distance` (deterministic)."""
    n = distance.shape[0]
    centre = np.eye(n) - np.ones((n, n)) / n
    gram = -0.5 * centre @ (distance ** 2) @ centre
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:dims]
    coords = vectors[:, order] * np.sqrt(np.clip(values[order], 0.0, None))
    if coords.shape[1] < dims:  # fewer models than dims
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    return coords
