"""Import a textbook Keras Embedding -> GRU -> Dense(softmax) model and serve it exactly."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

import model
from model.data import load_bbc, per_label
from model.keras_import import KerasImportError, import_keras
from model.tokenizer import Vocab, tokenize
from worker.engine import Engine
from worker.messages import Record, TokenMessage

if not (importlib.util.find_spec("keras") and importlib.util.find_spec("h5py")):
    pytest.skip("needs keras and h5py (the keras extra)", allow_module_level=True)

# All heavy: importing Keras alone takes seconds, and the tests that compare with Keras fit it.
pytestmark = [pytest.mark.unit, pytest.mark.heavy]

keras = None  # imported by _import_keras, not when pytest collects this module


@pytest.fixture(scope="module", autouse=True)
def _import_keras():
    """Import Keras for the first test that runs here: a run that deselects these tests does
    not pay the seconds its import takes."""
    global keras
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = importlib.import_module("keras")


LABELS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def corpus():
    docs = per_label(load_bbc(), 24, seed=3)
    toks = [tokenize(d.text)[:100] for d in docs]
    built = Vocab.build(toks, min_freq=2)
    # A Keras-style vocab: id 0 padding (""), id 1 the OOV token, then words.
    itos = ["", "[UNK]", *built.itos[2:]]
    stoi = {t: i for i, t in enumerate(itos)}
    ids = [[stoi.get(t, 1) for t in ts] for ts in toks]
    y = np.array([LABELS.index(d.label) for d in docs])
    return itos, toks, ids, y


def build(vocab_size, layers, *, reset_after=True, hidden_dense=0, seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input(shape=(None,), dtype="int32"),
                          keras.layers.Embedding(input_dim=vocab_size, output_dim=16)])
    for i in range(layers):
        m.add(keras.layers.GRU(units=24, return_sequences=i < layers - 1, reset_after=reset_after))
    if hidden_dense:
        m.add(keras.layers.Dense(hidden_dense, activation="relu"))
    m.add(keras.layers.Dense(units=len(LABELS), activation="softmax"))
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def train_briefly(m, ids, y):
    T = max(map(len, ids))
    x = np.zeros((len(ids), T), np.int32)
    for i, s in enumerate(ids):
        x[i, : len(s)] = s  # post-padding; the GRU reads the padded tail too, fine for training
    m.fit(x, y, epochs=6, batch_size=32, verbose=0)


def write_vocab(tmp_path, itos, as_json=False):
    if as_json:
        p = tmp_path / "vocab.json"
        p.write_text(json.dumps({t: i for i, t in enumerate(itos) if i > 0}))
    else:
        p = tmp_path / "vocab.txt"
        p.write_text("\n".join(itos) + "\n")
    return p


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The textbook model, trained briefly, saved as .keras and as legacy .h5."""
    itos, toks, ids, y = corpus
    m = build(len(itos), 1)
    train_briefly(m, ids, y)
    d = tmp_path_factory.mktemp("single")
    m.save(d / "model.keras")
    m.save(d / "model.h5")
    return m, d


@pytest.fixture(scope="module")
def stacked(corpus, tmp_path_factory):
    itos, toks, ids, y = corpus
    m = build(len(itos), 2, hidden_dense=12)
    train_briefly(m, ids, y)
    d = tmp_path_factory.mktemp("stacked")
    m.save(d / "model.keras")
    return m, d


@pytest.mark.parametrize("which,fmt,as_json", [
    ("single", "keras", False), ("single", "h5", True), ("stacked", "keras", True)])
def test_imported_model_equals_keras_predict(corpus, tmp_path, request, which, fmt, as_json):
    itos, toks, ids, y = corpus
    m, d = request.getfixturevalue(which)
    out = tmp_path / "artifact"
    model_id = import_keras(d / f"model.{fmt}", write_vocab(tmp_path, itos, as_json), LABELS, out)
    clf = model.load(out)
    assert clf.model_id == model_id and clf.labels == tuple(LABELS)
    engine = Engine(clf.model)
    worst = 0.0
    for k in range(0, len(toks), 5):  # many unpadded texts, one at a time
        want = m.predict(np.array([ids[k]], np.int32), verbose=0)[0]
        got = np.array([clf.classify(toks[k])[l] for l in LABELS])
        # the streaming step through the worker's engine, in 3 chunks
        chunks = np.array_split(np.array(clf.encode(toks[k])), 3)
        state = None
        for seq, c in enumerate(chunks):
            msg = TokenMessage("s", seq, c.tolist(), False, Record("t", 0, seq, b"s", b"", 0))
            res = engine.apply([msg], {"s": state})
            state = res.updates[0].value
        streamed = np.array(res.updates[0].predictions[-1].probs)
        worst = max(worst, np.abs(got - want).max(), np.abs(streamed - want).max())
    assert worst <= 1e-5, worst


def test_reset_after_false_is_rejected_by_name(corpus, tmp_path):
    itos, *_ = corpus
    m = build(len(itos), 1, reset_after=False)
    m.save(tmp_path / "m.keras")
    with pytest.raises(KerasImportError, match="reset_after=False"):
        import_keras(tmp_path / "m.keras", write_vocab(tmp_path, itos), LABELS, tmp_path / "o")


def _save(tmp_path, layers, name="m.keras"):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input(shape=(None,), dtype="int32"), *layers])
    m.save(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("make_layers,match", [
    (lambda: [keras.layers.Embedding(50, 8), keras.layers.Bidirectional(keras.layers.GRU(4)),
              keras.layers.Dense(5, activation="softmax")], "Bidirectional"),
    (lambda: [keras.layers.Embedding(50, 8), keras.layers.LSTM(4),
              keras.layers.Dense(5, activation="softmax")], "unsupported layer types: \\['LSTM'\\]"),
    (lambda: [keras.layers.Embedding(50, 8), keras.layers.GRU(4),
              keras.layers.Dense(5)], "only a softmax head"),
    (lambda: [keras.layers.Embedding(50, 8), keras.layers.GRU(4, go_backwards=True),
              keras.layers.Dense(5, activation="softmax")], "go_backwards"),
    (lambda: [keras.layers.Embedding(50, 8), keras.layers.GRU(4, return_sequences=True),
              keras.layers.Dense(5, activation="softmax")], "return_sequences"),
])
def test_unsupported_models_are_rejected_with_what_is_unsupported(tmp_path, make_layers, match):
    path = _save(tmp_path, make_layers())
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(["", "[UNK]"] + [f"w{i}" for i in range(48)]) + "\n")
    with pytest.raises(KerasImportError, match=match):
        import_keras(path, vocab, LABELS, tmp_path / "o")


def test_masking_layer_is_rejected(tmp_path):
    path = _save(tmp_path, [keras.layers.Embedding(50, 8), keras.layers.Masking(),
                            keras.layers.GRU(4), keras.layers.Dense(5, activation="softmax")])
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(["", "[UNK]"] + [f"w{i}" for i in range(48)]) + "\n")
    with pytest.raises(KerasImportError, match="Masking"):
        import_keras(path, vocab, LABELS, tmp_path / "o")


def test_vocab_and_label_errors(tmp_path):
    path = _save(tmp_path, [keras.layers.Embedding(10, 4), keras.layers.GRU(3),
                            keras.layers.Dense(5, activation="softmax")])
    v = tmp_path / "v.txt"
    v.write_text("\n".join(["", "a", "b"]) + "\n")
    with pytest.raises(KerasImportError, match="no out-of-vocabulary token"):
        import_keras(path, v, LABELS, tmp_path / "o")
    v.write_text("\n".join(["", "[UNK]"] + [f"w{i}" for i in range(12)]) + "\n")
    with pytest.raises(KerasImportError, match="out of range for the Embedding's input_dim 10"):
        import_keras(path, v, LABELS, tmp_path / "o")
    v.write_text("\n".join(["", "[UNK]", "a"]) + "\n")
    with pytest.raises(KerasImportError, match="5 outputs but 2 labels"):
        import_keras(path, v, ["x", "y"], tmp_path / "o")


def test_gate_order_is_not_an_accident(corpus, single, tmp_path):
    """Keeping Keras' z|r|h order must break equality: the test above can fail."""
    from model import keras_import
    itos, toks, ids, y = corpus
    m, d = single
    orig = keras_import._gates
    keras_import._gates = lambda mat, h: torch.from_numpy(np.ascontiguousarray(mat.T))
    try:
        import_keras(d / "model.keras", write_vocab(tmp_path, itos), LABELS, tmp_path / "bad")
    finally:
        keras_import._gates = orig
    clf = model.load(tmp_path / "bad")
    worst = max(np.abs(np.array([clf.classify(toks[k])[l] for l in LABELS])
                       - m.predict(np.array([ids[k]], np.int32), verbose=0)[0]).max()
                for k in range(0, len(toks), 10))
    assert worst > 1e-2


# --- crafted files fail before anything large is allocated (issue 26, F4) ------------------

def _sequential_config() -> dict:
    layer = lambda cls, **cfg: {"class_name": cls, "config": cfg}
    return {"class_name": "Sequential", "config": {"layers": [
        layer("InputLayer", name="input"), layer("Embedding", name="embedding"),
        layer("GRU", name="gru", units=4), layer("Dense", name="dense", activation="softmax",
                                                 units=5)]}}


def _huge_dataset_h5(path, where: str, attrs: dict | None = None) -> None:
    """An HDF5 file that declares a 20000 x 20000 float32 dataset (1.6 GB) and stores none of
    it: HDF5 allocates a dataset's storage when it is written, and this one never is."""
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset(where, shape=(20_000, 20_000), dtype="float32")
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def _assert_fails_fast(path, match):
    from model.keras_import import read_keras

    from .peak import measure
    cost = measure(lambda: read_keras(path))
    print(cost)
    assert isinstance(cost.error, KerasImportError), cost.error
    assert re.search(match, str(cost.error)) and "\n" not in str(cost.error), str(cost.error)
    assert cost.seconds < 0.5, cost
    assert cost.rss_growth < 32 * 2**20 and cost.traced_peak < 4 * 2**20, cost


def test_a_tiny_keras_file_declaring_a_huge_dataset_fails_fast(tmp_path):
    import zipfile
    _huge_dataset_h5(tmp_path / "w.h5", "layers/embedding/vars/0")
    path = tmp_path / "huge.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", json.dumps(_sequential_config()))
        z.write(tmp_path / "w.h5", "model.weights.h5")
    assert path.stat().st_size < 1500
    _assert_fails_fast(path, r"dataset /layers/embedding/vars/0 declares shape \(20000, 20000\), "
                             r"more than the 100,000,000 weights allowed")


def test_a_legacy_h5_declaring_a_huge_dataset_fails_fast(tmp_path):
    path = tmp_path / "huge.h5"
    _huge_dataset_h5(path, "model_weights/embedding/embedding/embeddings:0",
                     {"model_config": json.dumps(_sequential_config())})
    _assert_fails_fast(path, r"declares shape \(20000, 20000\)")


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
    """A 1 MB .keras whose config.json inflates to 1 GiB (deflate's ratio is about 1000:1)."""
    import zipfile
    path = tmp_path_factory.mktemp("bomb") / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("config.json", "w", force_zip64=True) as f:
            chunk = b" " * 2**20
            for _ in range(1024):
                f.write(chunk)
        z.writestr("model.weights.h5", b"")
    return path


def test_a_zip_bomb_config_fails_on_its_declared_size(zip_bomb):
    assert zip_bomb.stat().st_size < 2 * 2**20
    _assert_fails_fast(zip_bomb, r"config.json inflates to 1,073,741,824 bytes, over the limit "
                                 r"of 1,048,576")


def test_the_weight_budget_is_a_setting(single, tmp_path, corpus):
    itos, *_ = corpus
    m, d = single
    n = sum(int(np.prod(w.shape)) for w in m.weights)
    vocab = write_vocab(tmp_path, itos)
    assert import_keras(d / "model.keras", vocab, LABELS, tmp_path / "ok", max_parameters=n)
    with pytest.raises(KerasImportError, match=f"more than the {n - 1:,} weights allowed"):
        import_keras(d / "model.keras", vocab, LABELS, tmp_path / "no", max_parameters=n - 1)
