"""Offline evaluation: accuracy after each prefix fraction, macro-F1 and the confusion matrix.

One ``forward`` over each full text gives the logits at every position, so the accuracy
after 10%, 25%, 50%, 75% and 100% of the tokens all come from the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .gru import GRUClassifier

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def prefix_index(n_tokens: int, fraction: float) -> int:
    """Position whose output is the prediction after ``fraction`` of ``n_tokens`` tokens."""
    return max(1, math.ceil(fraction * n_tokens)) - 1


@torch.inference_mode()
def predict_prefixes(model: GRUClassifier, sequences: Sequence[Sequence[int]],
                     fractions: Sequence[float] = FRACTIONS, batch_size: int = 64,
                     device: str = "cpu") -> torch.Tensor:
    """Predicted label ids, (N, F): row i, column j is the prediction for text i after
    ``fractions[j]`` of its tokens. Empty texts predict from the initial state."""
    model.eval()
    out = torch.empty(len(sequences), len(fractions), dtype=torch.long)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        lens = [max(1, len(sequences[i])) for i in idx]
        ids = torch.zeros(len(idx), max(lens), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        logits = model(ids.to(device)).cpu()  # (B, T, C)
        for row, i in enumerate(idx):
            n = len(sequences[i])
            pos = [prefix_index(n, f) if n else 0 for f in fractions]
            out[i] = logits[row, pos].argmax(-1)
    return out


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> list[list[int]]:
    m = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        m[t][p] += 1
    return m


def macro_f1(matrix: list[list[int]]) -> float:
    scores = []
    for k in range(len(matrix)):
        tp = matrix[k][k]
        fp = sum(matrix[r][k] for r in range(len(matrix))) - tp
        fn = sum(matrix[k]) - tp
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def evaluate(model: GRUClassifier, sequences: Sequence[Sequence[int]], targets: Sequence[int],
             labels: Sequence[str], fractions: Sequence[float] = FRACTIONS,
             device: str = "cpu") -> dict:
    preds = predict_prefixes(model, sequences, fractions, device=device)
    y = torch.tensor(list(targets))
    acc = {f"{f:g}": float((preds[:, j] == y).float().mean()) for j, f in enumerate(fractions)}
    full = preds[:, list(fractions).index(1.0)].tolist() if 1.0 in fractions else preds[:, -1].tolist()
    matrix = confusion_matrix(list(targets), full, len(labels))
    return {
        "n": len(sequences),
        "accuracy": acc["1"] if "1" in acc else None,
        "accuracy_at_fraction": acc,
        "macro_f1": macro_f1(matrix),
        "labels": list(labels),
        "confusion_matrix": matrix,
    }
