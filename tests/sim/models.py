"""The simulator's models: small random-weight ``GRUClassifier``s built in-process from a seed
(milliseconds, no training), and their offline forward, which the oracle runs.

A rollout needs two that differ the way real ones do: another vocabulary (the previous
model's is larger, and the same word has other ids), other weights, another state shape.
Head weights are scaled up so that the top label usually wins by a clear margin: the
emit policies compare labels, and a near tie would make the oracle's decision a coin toss.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.gru import GRUClassifier, ModelConfig
from model.tokenizer import PAD, UNK, Vocab

LABELS = ("alpha", "beta", "gamma", "delta")
WORDS = tuple(f"w{i}" for i in range(60))  # the workload's words; each model knows a part


@dataclass(frozen=True)
class SimModel:
    model_id: str
    model: GRUClassifier
    vocab: Vocab
    labels: tuple[str, ...] = LABELS

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def layers(self) -> int:
        return self.model.config.num_layers

    @property
    def state_size(self) -> int:
        return self.model.config.state_size

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return self.vocab.encode(tokens)

    @torch.inference_mode()
    def run(self, messages: Sequence[Sequence[int]], h: np.ndarray | None = None
            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Step a session through ``messages`` (token ids each) from ``h`` (None: zeros), as
        the worker does one message at a time; (h (L, S), probs (C,)) after each."""
        state = (self.model.initial_state(1) if h is None
                 else torch.from_numpy(np.asarray(h, np.float32))[:, None, :].clone())
        out = []
        for ids in messages:
            t = torch.tensor([list(ids)], dtype=torch.long)
            state, probs = self.model.step(state, t, torch.tensor([len(ids)]))
            out.append((state[:, 0].numpy().copy(), probs[0].numpy().copy()))
        return out


def _build(seed: int, name: str, words: Sequence[str], config: ModelConfig) -> SimModel:
    torch.manual_seed(seed)
    model = GRUClassifier(config)
    with torch.no_grad():
        model.head.weight.mul_(6.0)
        model.head.bias.mul_(3.0)
    model.eval()
    vocab = Vocab((PAD, UNK, *words))
    assert len(vocab) == config.vocab_size
    return SimModel(f"sim-{name}-{seed}", model, vocab)


@functools.lru_cache(maxsize=4)
def model_pair(seed: int = 0) -> tuple[SimModel, SimModel]:
    """(old, new): the model that serves first, and the one a rollout brings. The old one
    has the larger vocabulary (48 ids against 40), and the words they share have other ids."""
    old_words = WORDS[2:48]  # ids 2..47
    new_words = tuple(reversed(WORDS[12:50]))  # 38 words, other ids; w2..w11 unknown to it
    old = _build(1000 + seed, "old", old_words,
                 ModelConfig(vocab_size=48, num_labels=len(LABELS), embed_dim=8, hidden_size=8,
                             dropout=0.0))
    new = _build(2000 + seed, "new", new_words,
                 ModelConfig(vocab_size=40, num_labels=len(LABELS), embed_dim=8, hidden_size=6,
                             dropout=0.0, mean_dim=2))
    return old, new
