"""The GRU text classifier: Embedding -> GRU (L layers, hidden H) -> Linear over C labels.

One set of weights serves two entry points:

* ``forward(token_ids[B,T], lengths)`` gives logits at every position; it serves training
  and offline evaluation.
* ``step(h[L,B,H], token_ids[B,K], lengths[B])`` advances B independent sessions by one
  message each (K_b = lengths[b] tokens) and returns the new state and the class
  probabilities after each message. It is what the streaming worker calls.

A GRU has no cell state: a session's whole memory is ``h``, one vector per layer. Folding
``step`` over any chunking of a text gives the same ``h`` and probabilities as ``forward``
over the whole text (see tests/test_gru.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "linear": lambda x: x}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    num_labels: int
    embed_dim: int = 128
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.2  # on embeddings and between layers; inactive in eval mode
    head_hidden: int = 0  # > 0: a Dense layer of this width (then head_activation) before the head
    head_activation: str = "relu"

    def to_dict(self) -> dict:
        return asdict(self)


class GRUClassifier(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        if config.head_activation not in _ACTIVATIONS:
            raise ValueError(f"head_activation {config.head_activation!r} is not one of "
                             f"{sorted(_ACTIVATIONS)}")
        self.pre_head = nn.Linear(config.hidden_size, config.head_hidden) if config.head_hidden else None
        self.head = nn.Linear(config.head_hidden or config.hidden_size, config.num_labels)

    def classify_hidden(self, out: torch.Tensor) -> torch.Tensor:
        """Logits from top-layer GRU outputs, (..., H) -> (..., C)."""
        x = self.drop(out)
        if self.pre_head is not None:
            x = _ACTIVATIONS[self.config.head_activation](self.pre_head(x))
        return self.head(x)

    def initial_state(self, batch: int, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        c = self.config
        return torch.zeros(c.num_layers, batch, c.hidden_size, device=device, dtype=dtype)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                h0: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position, (B, T, C).

        The GRU reads left to right, so right padding never changes the outputs at real
        positions; ``lengths`` is accepted for symmetry with ``step`` and callers mask
        positions ``>= lengths`` themselves.
        """
        x = self.drop(self.embed(token_ids))  # (B, T, E)
        out, _ = self.gru(x, h0)  # (B, T, H)
        return self.classify_hidden(out)  # (B, T, C)

    @torch.inference_mode()
    def step(self, h: torch.Tensor, token_ids: torch.Tensor,
             lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance B sessions by one message each.

        h: (L, B, H) states before the message; token_ids: (B, K) right-padded;
        lengths: (B,) real tokens per row, >= 0. Returns (new h (L, B, H), probs (B, C)).
        A row with length 0 keeps its state.
        """
        h_new = h.clone()
        moving = lengths > 0
        if bool(moving.any()):
            rows = moving.nonzero(as_tuple=True)[0]
            x = self.embed(token_ids[rows])  # (B', K, E)
            packed = pack_padded_sequence(x, lengths[rows].cpu(), batch_first=True,
                                          enforce_sorted=False)
            _, h_rows = self.gru(packed, h[:, rows].contiguous())  # (L, B', H)
            h_new[:, rows] = h_rows
        probs = torch.softmax(self.classify_hidden(h_new[-1]), dim=-1)  # (B, C)
        return h_new, probs
