"""Word-level tokenizer and vocabulary.

Tokenization is deterministic: lower-case, then a regex that keeps words (with inner
apostrophes or hyphens) and numbers. The vocabulary is built from training text with a
minimum frequency; ids 0 and 1 are reserved for ``<pad>`` and ``<unk>``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
TOKEN_PATTERN = r"[a-z0-9]+(?:['\-][a-z0-9]+)*"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-case word tokens."""
    return _TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class Vocab:
    """An immutable token <-> id map. ``itos[i]`` is the token with id ``i``."""

    itos: tuple[str, ...]
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.itos[:2] != (PAD, UNK):
            raise ValueError(f"vocab must start with {PAD!r}, {UNK!r}; got {self.itos[:2]!r}")
        stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(stoi) != len(self.itos):
            raise ValueError("vocab has duplicate tokens")
        object.__setattr__(self, "stoi", stoi)

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, texts: Iterable[Sequence[str]], min_freq: int = 2,
              max_size: int | None = None) -> "Vocab":
        """Build from tokenized texts; ties in frequency break alphabetically (deterministic)."""
        counts: Counter[str] = Counter()
        for tokens in texts:
            counts.update(tokens)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max(0, max_size - 2)]
        return cls((PAD, UNK, *kept))

    def encode(self, tokens: Iterable[str]) -> list[int]:
        stoi = self.stoi
        return [stoi.get(t, UNK_ID) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]
