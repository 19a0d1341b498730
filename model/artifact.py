"""Model artifacts: a directory that loads without running any code.

    DIR/config.json          architecture, labels, tokenizer, training settings, model_id
    DIR/vocab.json           the token list, index = id
    DIR/weights.safetensors  the tensors, in the safetensors format (no pickle)

``model_id`` is a content hash of the weights, the vocab and the architecture, so two
artifacts with the same id compute the same function. Loading checks every tensor's shape against the config.
The safetensors format is small enough to read and write here directly: 8 bytes of header
length (little-endian u64), a JSON header, then raw little-endian tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .gru import GRUClassifier, ModelConfig
from .tokenizer import TOKEN_PATTERN, Vocab, tokenize

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "weights.safetensors"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "BF16": None}
_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


class ArtifactError(ValueError):
    """The artifact directory is missing, corrupt or does not match its config."""


# --- safetensors -------------------------------------------------------------------------

def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    header: dict[str, dict] = {}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = tensors[name].detach().cpu().contiguous().numpy()
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ArtifactError(f"{path}: too short to be a safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise ArtifactError(f"{path}: header length {n} does not fit a {len(raw)}-byte file")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: header is not valid JSON ({e})") from None
    data = memoryview(raw)[8 + n:]
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = [int(s) for s in meta["shape"]]
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: bad header entry for {name!r} ({e!r})") from None
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        count = int(np.prod(shape)) if shape else 1
        if not 0 <= start <= end <= len(data) or end - start != count * np.dtype(dtype).itemsize:
            raise ArtifactError(f"{path}: tensor {name!r} offsets {start}:{end} do not match "
                                f"shape {shape} {meta['dtype']} in a {len(data)}-byte data section")
        arr = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder("<"))
        out[name] = torch.from_numpy(arr.astype(dtype).reshape(shape))
    return out


# --- artifact ----------------------------------------------------------------------------

def _model_id(weights_path: Path, vocab_path: Path, architecture: Mapping) -> str:
    """Content hash of what determines the function: weights, vocab and architecture."""
    h = hashlib.sha256()
    h.update(weights_path.read_bytes())
    h.update(vocab_path.read_bytes())
    h.update(json.dumps(dict(architecture), sort_keys=True).encode())
    return h.hexdigest()[:16]


def save(out_dir: str | Path, model: GRUClassifier, vocab: Vocab, labels: Sequence[str],
         training: Mapping | None = None, label_prior: Mapping[str, float] | None = None) -> str:
    """Write the artifact and return its model_id. ``label_prior``: each label's share of the
    training split, what the worker's label-drift series compare live final labels with."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / WEIGHTS_FILE)
    (out / VOCAB_FILE).write_text(json.dumps(list(vocab.itos), ensure_ascii=False))
    architecture = {"type": "gru_classifier", **model.config.to_dict()}
    model_id = _model_id(out / WEIGHTS_FILE, out / VOCAB_FILE, architecture)
    config = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "architecture": architecture,
        "labels": list(labels),
        "tokenizer": {"type": "word_regex", "lowercase": True, "pattern": TOKEN_PATTERN,
                      "pad_id": 0, "unk_id": 1},
        "training": dict(training or {}),
    }
    if label_prior is not None:
        if set(label_prior) != set(labels):
            raise ValueError(f"label_prior names {sorted(label_prior)}, not the labels {list(labels)}")
        config["label_prior"] = {l: float(label_prior[l]) for l in labels}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return model_id


@dataclass
class Classifier:
    """A loaded artifact: the model in eval mode, its vocab, labels and identity."""

    model: GRUClassifier
    vocab: Vocab
    labels: tuple[str, ...]
    model_id: str
    config: dict

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return self.vocab.encode(tokens)

    @property
    def label_prior(self) -> dict[str, float] | None:
        """Each label's share of the training split; None for artifacts that predate it."""
        prior = self.config.get("label_prior")
        if not isinstance(prior, dict) or set(prior) != set(self.labels):
            return None
        return {l: float(prior[l]) for l in self.labels}

    @torch.inference_mode()
    def probabilities(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Class probabilities after the whole sequence, (C,). Empty input gives the prior."""
        h = self.model.initial_state(1)
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        _, probs = self.model.step(h, ids, torch.tensor([len(token_ids)]))
        return probs[0]

    def classify(self, tokens: Sequence[str]) -> dict[str, float]:
        """Label -> probability after reading ``tokens`` from the start."""
        probs = self.probabilities(self.encode(tokens))
        return {label: float(p) for label, p in zip(self.labels, probs)}

    def classify_text(self, text: str) -> dict[str, float]:
        return self.classify(tokenize(text))


def load(model_dir: str | Path, device: str = "cpu") -> Classifier:
    """Load and verify an artifact. Raises ArtifactError with the reason on any mismatch."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ArtifactError(f"model dir {str(d)!r} is not a directory")
    for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ArtifactError(f"model dir {str(d)!r} has no {name}")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
        itos = json.loads((d / VOCAB_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{d}: config.json or vocab.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d}/config.json: format_version must be {FORMAT_VERSION}")
    if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
        raise ArtifactError(f"{d}/vocab.json must be a JSON list of strings")
    try:
        vocab = Vocab(tuple(itos))
        arch = {k: v for k, v in config["architecture"].items() if k != "type"}
        mconf = ModelConfig(**arch)
        labels = tuple(config["labels"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{d}/config.json is malformed ({e})") from None
    if mconf.vocab_size != len(vocab):
        raise ArtifactError(f"{d}: config vocab_size={mconf.vocab_size} but vocab.json has "
                            f"{len(vocab)} tokens")
    if mconf.num_labels != len(labels):
        raise ArtifactError(f"{d}: config num_labels={mconf.num_labels} but {len(labels)} labels")
    expected_id = _model_id(d / WEIGHTS_FILE, d / VOCAB_FILE, config["architecture"])
    if config.get("model_id") != expected_id:
        raise ArtifactError(f"{d}: model_id {config.get('model_id')!r} does not match the content "
                            f"hash {expected_id!r} of the weights and vocab (corrupt or edited)")
    model = GRUClassifier(mconf)
    tensors = load_safetensors(d / WEIGHTS_FILE)
    want = model.state_dict()
    missing, extra = set(want) - set(tensors), set(tensors) - set(want)
    if missing or extra:
        raise ArtifactError(f"{d}: weights missing {sorted(missing)} / unexpected {sorted(extra)}")
    for name, t in want.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ArtifactError(f"{d}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                f"config implies {tuple(t.shape)}")
    model.load_state_dict(tensors)
    model.eval().to(device)
    return Classifier(model=model, vocab=vocab, labels=labels, model_id=expected_id, config=config)
