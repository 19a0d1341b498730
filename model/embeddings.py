"""Word vectors from the training corpus itself, to initialise the embedding table.

A few thousand labelled documents are too few to learn 15k word vectors from the labels
alone. The corpus says more: the positive PMI of each word with its neighbours, reduced by
a truncated SVD (the count-based twin of word2vec, Levy & Goldberg 2014), puts related
words close together. It takes seconds, uses only the training texts and needs nothing
beyond numpy and torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch


def cooccurrence(seqs: Sequence[Sequence[int]], vocab_size: int,
                 window: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric counts of word pairs at most ``window`` apart, weighted 1 / distance, as
    COO arrays (rows, cols, weights) with each pair once. Ids 0 (padding) and 1 (unknown)
    are left out."""
    # One long stream in which ``window`` padding ids separate the texts: no pair spans two.
    sep = np.zeros(window, dtype=np.int64)
    ids = np.concatenate([part for s in seqs for part in (np.asarray(s, dtype=np.int64), sep)])
    codes, weights = [], []
    for d in range(1, window + 1):
        a, b = ids[:-d], ids[d:]
        keep = (a > 1) & (b > 1)
        a, b = a[keep], b[keep]
        codes += [a * vocab_size + b, b * vocab_size + a]
        weights.append(np.full(2 * len(a), 1.0 / d))
    uniq, inverse = np.unique(np.concatenate(codes), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(weights))
    return uniq // vocab_size, uniq % vocab_size, counts


def ppmi_svd(seqs: Sequence[Sequence[int]], vocab_size: int, dim: int, window: int = 5,
             alpha: float = 0.75, seed: int = 0) -> torch.Tensor:
    """(V, dim) word vectors: the rank-``dim`` SVD of the positive PMI matrix (context
    frequencies smoothed by ``alpha``), U * sqrt(S), scaled to unit variance per coordinate
    (the scale of nn.Embedding's own init). Rows 0 and 1, and words never seen next to
    another, are zero."""
    rows, cols, counts = cooccurrence(seqs, vocab_size, window)
    total = counts.sum()
    row_sum = np.bincount(rows, weights=counts, minlength=vocab_size)
    ctx = np.bincount(cols, weights=counts, minlength=vocab_size) ** alpha
    pmi = np.log(counts / total) - np.log(row_sum[rows] / total) - np.log(ctx[cols] / ctx.sum())
    keep = pmi > 0
    ppmi = torch.sparse_coo_tensor(np.stack([rows[keep], cols[keep]]),
                                   torch.from_numpy(pmi[keep]).float(), (vocab_size, vocab_size),
                                   check_invariants=False).coalesce()
    k = min(dim, vocab_size - 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        a, a_t = ppmi.to_sparse_csr(), ppmi.t().coalesce().to_sparse_csr()
    u, s = _randomized_svd(a, a_t, k, torch.Generator().manual_seed(seed))
    vec = u * s.sqrt()[None, :]  # (V, k)
    vec = vec / vec[2:].std().clamp_min(1e-8)
    out = torch.zeros(vocab_size, dim)
    out[:, :k] = vec
    out[:2] = 0.0
    return out


def _randomized_svd(a: torch.Tensor, a_t: torch.Tensor, k: int, gen: torch.Generator,
                    niter: int = 3, oversample: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` left singular vectors and values of sparse ``a`` (Halko et al. 2011:
    a random range, ``niter`` power iterations, then an exact SVD of the small projection)."""
    n = a.shape[1]
    q, _ = torch.linalg.qr(a @ torch.randn(n, k + oversample, generator=gen))  # (V, k')
    for _ in range(niter):
        z, _ = torch.linalg.qr(a_t @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_small, s, _ = torch.linalg.svd((a_t @ q).t(), full_matrices=False)  # of q^T a, (k', n)
    return (q @ u_small)[:, :k], s[:k]
