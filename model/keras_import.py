"""Import a Keras ``Embedding -> GRU(s) -> [Dense] -> Dense(softmax)`` model as an artifact.

Reads a Keras 3 ``.keras`` file (a zip of ``config.json`` and ``model.weights.h5``) or a legacy
``.h5`` file as data: JSON and HDF5 datasets, never code. Keras orders a GRU's gates z, r, h
along the kernel's columns; PyTorch orders them r, z, n along ``weight_ih``'s rows, so the
blocks are swapped and transposed. Keras' default ``reset_after=True`` is PyTorch's
formulation, bias[0] being the input bias and bias[1] the recurrent one.

Everything read is bounded before it is read: the zip members' sizes (declared, and then what
actually inflates), the legacy file's model_config attribute, and every HDF5 dataset's
declared shape and dtype (their element count, summed, at most ``max_parameters``).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import artifact
from .gru import GRUClassifier, ModelConfig
from .tokenizer import PAD, UNK, Vocab

MAX_CONFIG_BYTES = artifact.MAX_CONFIG_BYTES
HDF5_OVERHEAD_BYTES = 16 << 20  # a weights file's structure beyond its data
UNK_CANDIDATES = ("[UNK]", "<unk>", "<UNK>", "<OOV>", "<oov>", "UNK", "OOV")
_NO_OPS = {"InputLayer", "Dropout", "SpatialDropout1D"}  # identity at inference
_HIDDEN_ACTIVATIONS = {"relu", "tanh", "sigmoid", "linear"}


class KerasImportError(ValueError):
    """The file is unreadable, or the model uses something this importer does not support."""


# --- reading -----------------------------------------------------------------------------

def _h5py():
    try:
        import h5py
    except ImportError:
        raise KerasImportError("reading Keras files needs h5py (pip install h5py)") from None
    return h5py


def read_keras(path: str | Path, max_parameters: int = artifact.MAX_PARAMETERS
               ) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    """(layer configs in order, weights by layer name in Keras' variable order). At most
    ``max_parameters`` weights in all are read; no more than that is ever allocated."""
    p = Path(path)
    if not p.is_file():
        raise KerasImportError(f"{p} does not exist")
    budget = _Budget(p, max_parameters)
    if p.stat().st_size > budget.max_file_bytes:
        raise KerasImportError(f"{p}: {p.stat().st_size:,} bytes, over the limit of "
                               f"{budget.max_file_bytes:,} for {max_parameters:,} parameters")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                config = _json(_member(z, "config.json", MAX_CONFIG_BYTES, p), p)
                weights_bytes = _member(z, "model.weights.h5", budget.max_file_bytes, p)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise KerasImportError(f"{p}: a broken zip ({e})") from None
        layers = _layers(config, p)
        return layers, _by_layer_name(layers, _weights_v3(weights_bytes, budget))
    h5py = _h5py()
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise KerasImportError(f"{p} is neither a .keras zip nor an HDF5 file ({e})") from None
    with f:
        if "model_config" not in f.attrs:
            raise KerasImportError(f"{p} has no model_config: save the whole model, not weights only")
        # A fixed-length string's size is its storage; a variable-length one lives in the
        # file's heap, so the file's size (checked above) is its bound.
        size = f.attrs.get_id("model_config").get_storage_size()
        if size > MAX_CONFIG_BYTES:
            raise KerasImportError(f"{p}: model_config is {size:,} bytes, over the limit of "
                                   f"{MAX_CONFIG_BYTES:,}")
        raw = f.attrs["model_config"]
        config = _json(raw if isinstance(raw, (str, bytes)) else bytes(raw), p)
        return _layers(config, p), _weights_legacy(f, budget)


def _member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A zip member of at most ``limit`` bytes: its declared size is checked first, and the
    read stops at limit + 1 whatever the header says, so a bomb inflates no further."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise KerasImportError(f"{path} is a zip but not a .keras file (missing {name!r})") from None
    if info.file_size > limit:
        raise KerasImportError(f"{path}: {name} inflates to {info.file_size:,} bytes, over the "
                               f"limit of {limit:,}")
    with z.open(info) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise KerasImportError(f"{path}: {name} inflates past the limit of {limit:,} bytes")
    return data


def _json(raw: str | bytes, path: Path) -> dict:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise KerasImportError(f"{path}: the model config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise KerasImportError(f"{path}: the model config is not a JSON object")
    return config


class _Budget:
    """How many weights may still be read. Each HDF5 dataset is checked by its declared
    shape and dtype, which cost nothing to read, before its data is."""

    def __init__(self, path: Path, max_parameters: int) -> None:
        self.path, self.left, self.limit = path, max_parameters, max_parameters
        self.max_file_bytes = max_parameters * 8 + HDF5_OVERHEAD_BYTES

    def read(self, dataset) -> np.ndarray:
        name = getattr(dataset, "name", "?")
        shape = tuple(getattr(dataset, "shape", None) or ())
        if getattr(dataset, "dtype", None) is None or dataset.dtype.kind not in "fiu":
            raise KerasImportError(f"{self.path}: dataset {name} is not numeric "
                                   f"({getattr(dataset, 'dtype', None)})")
        n = math.prod(shape)
        if n > self.left:
            raise KerasImportError(f"{self.path}: dataset {name} declares shape {shape}, more "
                                   f"than the {self.limit:,} weights allowed in all "
                                   f"(GRU_MODEL__MAX_PARAMETERS)")
        self.left -= n
        return np.asarray(dataset)


def _layers(config: dict, path: Path) -> list[dict]:
    if config.get("class_name") != "Sequential":
        raise KerasImportError(f"{path}: only Sequential models are supported, got "
                               f"{config.get('class_name')!r}")
    layers = config.get("config", {}).get("layers")
    if not isinstance(layers, list):
        raise KerasImportError(f"{path}: the model config lists no layers")
    return [{"class_name": l.get("class_name"), **l.get("config", {})} for l in layers]


def _by_layer_name(layers: list[dict], by_path: dict[str, list[np.ndarray]]
                   ) -> dict[str, list[np.ndarray]]:
    """Keras 3 files store a Sequential's layers under paths named by class and position
    (``gru``, ``gru_1``, ...), not by layer name: map them back in order."""
    seen: dict[str, int] = {}
    out = {}
    for layer in layers:
        if layer["class_name"] == "InputLayer":
            continue
        base = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", layer["class_name"]).lower()
        n = seen.get(base, 0)
        seen[base] = n + 1
        path = base if n == 0 else f"{base}_{n}"
        if path in by_path:
            out[layer.get("name", path)] = by_path[path]
    return out


def _weights_v3(data: bytes, budget: _Budget) -> dict[str, list[np.ndarray]]:
    h5py = _h5py()
    out: dict[str, list[np.ndarray]] = {}
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            for name, group in f.get("layers", {}).items():
                vars_group = group["cell"]["vars"] if "cell" in group else group.get("vars", {})
                out[name] = [budget.read(vars_group[k]) for k in sorted(vars_group, key=int)]
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise KerasImportError(f"{budget.path}: model.weights.h5 is unreadable ({e})") from None
    return out


def _weights_legacy(f, budget: _Budget) -> dict[str, list[np.ndarray]]:
    order = ("embeddings", "kernel", "recurrent_kernel", "bias")
    out: dict[str, list[np.ndarray]] = {}
    root = f["model_weights"] if "model_weights" in f else f
    for name, group in root.items():
        datasets: dict[str, object] = {}
        group.visititems(lambda k, v: datasets.__setitem__(k.rsplit("/", 1)[-1].split(":")[0], v)
                         if hasattr(v, "shape") else None)
        out[name] = [budget.read(datasets[k]) for k in order if k in datasets]
    return out


# --- converting --------------------------------------------------------------------------

def _check_gru(layer: dict, last: bool) -> None:
    name = layer.get("name")
    if layer.get("reset_after", True) is not True:
        raise KerasImportError(
            f"GRU layer {name!r} uses reset_after=False (the original Cho et al. gates, reset "
            f"applied before the recurrent matmul); only reset_after=True, the Keras default "
            f"and PyTorch's formulation, is supported — retrain with reset_after=True")
    for option, want in (("activation", "tanh"), ("recurrent_activation", "sigmoid")):
        if layer.get(option, want) != want:
            raise KerasImportError(f"GRU layer {name!r} has {option}={layer[option]!r}; only "
                                   f"{want!r} is supported")
    if layer.get("go_backwards"):
        raise KerasImportError(f"GRU layer {name!r} has go_backwards=True; a stream only reads forwards")
    if bool(layer.get("return_sequences")) == last:
        raise KerasImportError(
            f"GRU layer {name!r} has return_sequences={layer.get('return_sequences')}; stacked GRUs "
            f"need return_sequences=True on every GRU but the last, which needs False")


def convert(layers: list[dict], weights: dict[str, list[np.ndarray]]
            ) -> tuple[ModelConfig, dict[str, torch.Tensor], int, int]:
    """Map the Keras layers onto GRUClassifier. Returns (config, state_dict, keras vocab size,
    number of labels); the embedding rows are still in Keras id order."""
    core = [l for l in layers if l["class_name"] not in _NO_OPS]
    kinds = [l["class_name"] for l in core]
    if "Bidirectional" in kinds:
        raise KerasImportError("Bidirectional GRUs are not supported: a stream only reads forwards")
    if "Masking" in kinds:
        raise KerasImportError("a Masking layer changes which steps the GRU takes; it is not supported")
    n_gru = kinds.count("GRU")
    head_dense = kinds[1 + n_gru:]
    if kinds[:1] != ["Embedding"] or n_gru == 0 or kinds[1:1 + n_gru] != ["GRU"] * n_gru \
            or head_dense not in (["Dense"], ["Dense", "Dense"]):
        other = sorted(set(kinds) - {"Embedding", "GRU", "Dense"})
        raise KerasImportError(
            f"unsupported model: layers {kinds}; supported is Embedding -> GRU (one or more) -> "
            f"optional Dense -> Dense(softmax)" + (f"; unsupported layer types: {other}" if other else ""))
    emb, grus, denses = core[0], core[1:1 + n_gru], core[1 + n_gru:]
    if emb.get("mask_zero"):
        pass  # masks id 0 only, which is padding: unpadded streams never contain it
    for i, g in enumerate(grus):
        _check_gru(g, last=i == n_gru - 1)
    units = {g["units"] for g in grus}
    if len(units) != 1:
        raise KerasImportError(f"stacked GRUs must all have the same units, got {sorted(units)}")
    if denses[-1].get("activation") != "softmax":
        raise KerasImportError(f"the last Dense layer has activation {denses[-1].get('activation')!r}; "
                               f"only a softmax head is supported")
    head_hidden, head_act = 0, "relu"
    if len(denses) == 2:
        head_act = denses[0].get("activation", "linear")
        if head_act not in _HIDDEN_ACTIVATIONS:
            raise KerasImportError(f"Dense layer {denses[0].get('name')!r} has activation "
                                   f"{head_act!r}; supported: {sorted(_HIDDEN_ACTIVATIONS)}")
        head_hidden = denses[0]["units"]

    def w(layer: dict, n: int) -> list[np.ndarray]:
        vals = weights.get(layer["name"])
        if vals is None or len(vals) < n:
            raise KerasImportError(f"no weights (or too few) for layer {layer['name']!r}")
        return [np.asarray(v, dtype=np.float32) for v in vals]

    (E,) = w(emb, 1)[:1]
    H = grus[0]["units"]
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.from_numpy(E)}
    for k, g in enumerate(grus):
        vals = w(g, 2)
        kernel, recurrent = vals[0], vals[1]
        if not isinstance(H, int) or recurrent.shape != (H, 3 * H):
            raise KerasImportError(f"GRU layer {g['name']!r} has units={H!r} but a recurrent "
                                   f"kernel of shape {recurrent.shape}, expected (H, 3H)")
        bias = vals[2] if g.get("use_bias", True) and len(vals) > 2 else np.zeros((2, 3 * H), np.float32)
        if bias.shape != (2, 3 * H):
            raise KerasImportError(f"GRU layer {g['name']!r} bias has shape {bias.shape}, "
                                   f"expected (2, {3 * H}) for reset_after=True")
        sd[f"gru.weight_ih_l{k}"] = _gates(kernel, H)
        sd[f"gru.weight_hh_l{k}"] = _gates(recurrent, H)
        sd[f"gru.bias_ih_l{k}"] = _gates(bias[0][None, :], H)[:, 0]
        sd[f"gru.bias_hh_l{k}"] = _gates(bias[1][None, :], H)[:, 0]
    dense_w = [w(d, 1) for d in denses]
    for prefix, d, vals in zip(["pre_head", "head"][-len(denses):], denses, dense_w):
        sd[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(vals[0].T))
        sd[f"{prefix}.bias"] = torch.from_numpy(vals[1] if d.get("use_bias", True) and len(vals) > 1
                                                else np.zeros(vals[0].shape[1], np.float32))
    num_labels = dense_w[-1][0].shape[1]
    config = ModelConfig(vocab_size=E.shape[0], num_labels=num_labels, embed_dim=E.shape[1],
                         hidden_size=H, num_layers=n_gru, dropout=0.0, head_hidden=head_hidden,
                         head_activation=head_act)
    return config, sd, E.shape[0], num_labels


def _gates(m: np.ndarray, h: int) -> torch.Tensor:
    """Keras (in, 3H) with column blocks z|r|h -> PyTorch (3H, in) with row blocks r|z|n."""
    z, r, n = m[:, :h], m[:, h:2 * h], m[:, 2 * h:]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([r, z, n], axis=1).T))


# --- vocab and labels --------------------------------------------------------------------

def read_vocab(path: str | Path) -> dict[int, str]:
    """id -> token, from a token-per-line file (line i has id i), a JSON list, or a JSON map."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        obj = json.loads(text)
        if isinstance(obj, list):
            return dict(enumerate(str(t) for t in obj))
        if isinstance(obj, dict):
            out: dict[int, str] = {}
            for tok, i in obj.items():
                if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                    raise KerasImportError(f"{p}: id of {tok!r} must be an int >= 0, got {i!r}")
                if i in out:
                    raise KerasImportError(f"{p}: id {i} is given to both {out[i]!r} and {tok!r}")
                out[i] = tok
            return out
        raise KerasImportError(f"{p}: a JSON vocab must be a list or a token -> id map")
    return dict(enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")))


def read_labels(spec: str) -> list[str]:
    """A comma-separated list, or a file: one label per line, or a JSON list."""
    p = Path(spec)
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        labels = json.loads(text) if p.suffix == ".json" else [l for l in text.splitlines() if l.strip()]
    else:
        labels = [l.strip() for l in spec.split(",") if l.strip()]
    if len(set(labels)) != len(labels):
        raise KerasImportError(f"labels must be distinct, got {labels}")
    return [str(l) for l in labels]


def remap_vocab(id_to_token: dict[int, str], embeddings: torch.Tensor,
                unk_token: str | None = None) -> tuple[Vocab, torch.Tensor]:
    """Reorder the embedding rows into our layout: <pad> = 0, <unk> = 1, then the tokens."""
    V = embeddings.shape[0]
    too_big = [i for i in id_to_token if i >= V]
    if too_big:
        raise KerasImportError(f"vocab id {max(too_big)} ({id_to_token[max(too_big)]!r}) is out of "
                               f"range for the Embedding's input_dim {V}")
    by_token = {t: i for i, t in id_to_token.items()}
    unk = unk_token or next((c for c in UNK_CANDIDATES if c in by_token), None)
    if unk is None or unk not in by_token:
        raise KerasImportError(f"no out-of-vocabulary token found (looked for {list(UNK_CANDIDATES)}); "
                               f"name it with --unk-token")
    pad_id, unk_id = 0, by_token[unk]
    if unk_id == pad_id:
        raise KerasImportError(f"the unknown token {unk!r} has id 0, which Keras reserves for padding")
    rest = sorted((i, t) for i, t in id_to_token.items() if i not in (pad_id, unk_id) and t not in (PAD, UNK))
    rows = [pad_id, unk_id] + [i for i, _ in rest]
    return Vocab((PAD, UNK, *(t for _, t in rest))), embeddings[rows].clone()


def import_keras(model_path: str | Path, vocab_path: str | Path, labels: Sequence[str],
                 out_dir: str | Path, unk_token: str | None = None,
                 max_parameters: int = artifact.MAX_PARAMETERS) -> str:
    """Convert and write an artifact; returns its model_id."""
    layers, weights = read_keras(model_path, max_parameters)
    config, sd, _, num_labels = convert(layers, weights)
    if len(labels) != num_labels:
        raise KerasImportError(f"the model has {num_labels} outputs but {len(labels)} labels were given")
    vocab, emb = remap_vocab(read_vocab(vocab_path), sd["embed.weight"], unk_token)
    sd["embed.weight"] = emb
    config = ModelConfig(**{**config.to_dict(), "vocab_size": len(vocab)})
    model = GRUClassifier(config)
    model.load_state_dict(sd)
    return artifact.save(out_dir, model.eval(), vocab, labels,
                         {"imported_from": str(model_path), "format": "keras",
                          "unk_token": unk_token})
