"""Word vectors from the training corpus itself, to initialise the embedding table.

A few thousand labelled documents are too few to learn 15k word vectors from the labels
alone. The corpus says more: the positive PMI of each word with its neighbours, reduced by
a truncated SVD (Levy & Goldberg's count-based word2vec), gives vectors in which related
words sit close together. It takes seconds and uses only the training texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def cooccurrence(seqs: Sequence[Sequence[int]], vocab_size: int, window: int = 5):
    """Symmetric counts of word pairs at most ``window`` apart, weighted 1/distance; ids 0
    (padding) and 1 (unknown) are left out. A (V, V) scipy CSR matrix."""
    from scipy import sparse
    rows, cols, vals = [], [], []
    for s in seqs:
        ids = np.asarray(s, dtype=np.int64)
        for d in range(1, window + 1):
            a, b = ids[:-d], ids[d:]
            keep = (a > 1) & (b > 1)
            rows += [a[keep], b[keep]]
            cols += [b[keep], a[keep]]
            vals.append(np.full(2 * int(keep.sum()), 1.0 / d, dtype=np.float64))
    m = sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(vocab_size, vocab_size))
    return m.tocsr()  # duplicates are summed


def ppmi_svd(seqs: Sequence[Sequence[int]], vocab_size: int, dim: int, window: int = 5,
             alpha: float = 0.75, seed: int = 0) -> torch.Tensor:
    """(V, dim) word vectors: SVD of the positive PMI matrix (context distribution smoothed
    by ``alpha``), U * sqrt(S), scaled to unit variance per coordinate; rows 0 and 1 are zero.
    """
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd
    c = cooccurrence(seqs, vocab_size, window).tocoo()
    total = c.data.sum()
    row_sum = np.asarray(c.sum(axis=1)).ravel()
    ctx = np.asarray(c.sum(axis=0)).ravel() ** alpha
    ctx_p = ctx / ctx.sum()
    pmi = np.log(c.data * 1.0 / total) - np.log(row_sum[c.row] / total) - np.log(ctx_p[c.col])
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=c.shape)
    k = min(dim, vocab_size - 3)
    u, s, _ = randomized_svd(ppmi, n_components=k, n_iter=4, random_state=seed)
    vec = u * np.sqrt(s)[None, :]  # (V, k)
    used = vec[2:]
    vec = vec / max(float(used.std()), 1e-8)
    out = np.zeros((vocab_size, dim), dtype=np.float32)
    out[:, :k] = vec
    out[:2] = 0.0
    return torch.from_numpy(out)
