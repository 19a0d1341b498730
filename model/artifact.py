"""Model artifacts: a directory that loads without running any code.

    DIR/config.json          architecture, labels, tokenizer, training settings, model_id
    DIR/vocab.json           the token list, index = id
    DIR/weights.safetensors  the tensors, in the safetensors format (no pickle)

``model_id`` is a content hash of the weights, the vocab and the architecture, so two
artifacts with the same id compute the same function. Loading checks everything before it
allocates anything large (``load``'s docstring gives the order): file sizes, the parameter
count the config implies (against ``max_parameters``), and every tensor's declared shape in
the weights file's header against the config. The safetensors format is small enough to read
and write here directly: 8 bytes of header length (little-endian u64), a JSON header, then raw
little-endian tensor bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .gru import _ACTIVATIONS as ACTIVATIONS
from .gru import GRUClassifier, ModelConfig
from .tokenizer import TOKEN_PATTERN, Vocab, tokenize

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "weights.safetensors"
FORMAT_VERSION = 1
# What an artifact may declare before anything is allocated for it. A header of ours is about
# 1 KB (one entry per tensor); config.json a few KB; vocab.json about 12 bytes a token.
MAX_HEADER_BYTES = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
MAX_VOCAB_BYTES = 64 << 20
MAX_PARAMETERS = 100_000_000  # 400 MB of float32; GRU_MODEL__MAX_PARAMETERS
_ARCH_INTS = {"vocab_size": 2, "num_labels": 1, "embed_dim": 1, "hidden_size": 1,
              "num_layers": 1, "head_hidden": 0, "mean_dim": 0}  # field -> least value

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


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it; ``start`` is from the file's start."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, checked against the file's size, reading only
    its header: no tensor is read or allocated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ArtifactError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ArtifactError(f"{path}: header length {n} does not fit a {size}-byte file "
                                f"(or is over the limit of {MAX_HEADER_BYTES})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(_count(s) for s in meta["shape"])
            start, end = (_count(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: bad header entry for {name!r} ({e!r})") from None
        if dtype is None:
            raise ArtifactError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if not start <= end <= data_len or end - start != nbytes:
            raise ArtifactError(f"{path}: tensor {name!r} offsets {start}:{end} do not match "
                                f"shape {list(shape)} {meta['dtype']} in a {data_len}-byte data "
                                f"section")
        out[name] = TensorEntry(np.dtype(dtype), shape, data_start + start, nbytes)
    return out


def _count(value) -> int:
    """A shape or offset from a header: a non-negative int (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def read_tensors(path: Path, entries: Mapping[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """The declared tensors, each read straight from the file into its own array."""
    out = {}
    with open(path, "rb") as f:
        for name, e in entries.items():
            count = math.prod(e.shape)
            f.seek(e.start)
            arr = np.fromfile(f, dtype=e.dtype.newbyteorder("<"), count=count)
            if arr.size != count:
                raise ArtifactError(f"{path}: tensor {name!r} is truncated")
            out[name] = torch.from_numpy(arr.astype(e.dtype, copy=False).reshape(e.shape))
    return out


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, read_safetensors_header(path))


# --- artifact ----------------------------------------------------------------------------

def _model_id(weights_path: Path, vocab_path: Path, architecture: Mapping) -> str:
    """Content hash of what determines the function: weights, vocab and architecture."""
    h = hashlib.sha256()
    for path in (weights_path, vocab_path):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
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


def load(model_dir: str | Path, device: str = "cpu",
         max_parameters: int = MAX_PARAMETERS) -> Classifier:
    """Load and verify an artifact. Raises ArtifactError with the reason on any mismatch.

    Nothing large is allocated before the artifact has passed every check, in this order:

    1. the three files exist, and config.json, vocab.json and the weights' header are within
       their size limits;
    2. config.json's architecture is well-typed and agrees with vocab.json and the labels;
    3. the parameters it implies (``declared_shapes``: computed, nothing built) number at
       most ``max_parameters``;
    4. the weights file declares exactly those tensors, with those shapes, and holds their
       bytes;
    5. the content hash matches ``model_id``.

    Only then is the model built and its tensors read.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ArtifactError(f"model dir {str(d)!r} is not a directory")
    for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise ArtifactError(f"model dir {str(d)!r} has no {name}")
    config = _read_json(d / CONFIG_FILE, MAX_CONFIG_BYTES)
    itos = _read_json(d / VOCAB_FILE, MAX_VOCAB_BYTES)
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d}/config.json: format_version must be {FORMAT_VERSION}")
    if not isinstance(itos, list) or not all(isinstance(t, str) for t in itos):
        raise ArtifactError(f"{d}/vocab.json must be a JSON list of strings")
    try:
        vocab = Vocab(tuple(itos))
        arch = {k: v for k, v in config["architecture"].items() if k != "type"}
        _check_architecture(arch)
        mconf = ModelConfig(**arch)
        labels = tuple(config["labels"])
        if not all(isinstance(label, str) for label in labels):
            raise ValueError("labels must be strings")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{d}/config.json is malformed ({e})") from None
    if mconf.vocab_size != len(vocab):
        raise ArtifactError(f"{d}: config vocab_size={mconf.vocab_size} but vocab.json has "
                            f"{len(vocab)} tokens")
    if mconf.num_labels != len(labels):
        raise ArtifactError(f"{d}: config num_labels={mconf.num_labels} but {len(labels)} labels")
    want = declared_shapes(mconf)
    n_params = sum(math.prod(s) for s in want.values())
    if n_params > max_parameters:
        raise ArtifactError(f"{d}/config.json: the architecture has {n_params:,} parameters, "
                            f"over the limit of {max_parameters:,} (GRU_MODEL__MAX_PARAMETERS)")
    entries = read_safetensors_header(d / WEIGHTS_FILE)
    missing, extra = set(want) - set(entries), set(entries) - set(want)
    if missing or extra:
        raise ArtifactError(f"{d}: weights missing {sorted(missing)} / unexpected {sorted(extra)}")
    for name, shape in want.items():
        if entries[name].shape != shape:
            raise ArtifactError(f"{d}: tensor {name!r} has shape {entries[name].shape}, "
                                f"config implies {shape}")
    expected_id = _model_id(d / WEIGHTS_FILE, d / VOCAB_FILE, config["architecture"])
    if config.get("model_id") != expected_id:
        raise ArtifactError(f"{d}: model_id {config.get('model_id')!r} does not match the content "
                            f"hash {expected_id!r} of the weights and vocab (corrupt or edited)")
    model = GRUClassifier(mconf)
    try:
        model.load_state_dict(read_tensors(d / WEIGHTS_FILE, entries))
    except RuntimeError as e:  # declared_shapes and the model disagree: a bug, said plainly
        raise ArtifactError(f"{d}: weights do not load into the model ({e})") from None
    model.eval().to(device)
    return Classifier(model=model, vocab=vocab, labels=labels, model_id=expected_id, config=config)


def declared_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict shapes ``GRUClassifier(config)`` has, computed without building it
    (tests/test_artifact.py checks them against built models of every option)."""
    V, E, H, L = config.vocab_size, config.embed_dim, config.hidden_size, config.num_layers
    M, D, C = config.mean_dim, config.head_hidden, config.num_labels
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, E)}
    for k in range(L):
        shapes[f"gru.weight_ih_l{k}"] = (3 * H, E if k == 0 else H)
        shapes[f"gru.weight_hh_l{k}"] = (3 * H, H)
        shapes[f"gru.bias_ih_l{k}"] = (3 * H,)
        shapes[f"gru.bias_hh_l{k}"] = (3 * H,)
    if M:
        shapes["mean_embed.weight"] = (V, M)
    if D:
        shapes["pre_head.weight"], shapes["pre_head.bias"] = (D, H + M), (D,)
    shapes["head.weight"], shapes["head.bias"] = (C, D or H + M), (C,)
    return shapes


def _check_architecture(arch: Mapping) -> None:
    for name, least in _ARCH_INTS.items():
        if name in arch:
            v = arch[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"architecture.{name}={v!r} must be an integer >= {least}")
    activation = arch.get("head_activation", "relu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"architecture.head_activation={activation!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    dropout = arch.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"architecture.dropout={dropout!r} must be a number in [0, 1)")


def _read_json(path: Path, limit: int):
    size = path.stat().st_size
    if size > limit:
        raise ArtifactError(f"{path}: {size:,} bytes, over the limit of {limit:,} for this file")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})") from None
