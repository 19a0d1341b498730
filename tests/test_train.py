import json

import pytest

import model
from model.data import load_bbc, split
from model.evaluate import evaluate
from model.tokenizer import tokenize

pytestmark = pytest.mark.unit


def test_tiny_training_run_learns(tiny_model_dir):
    summary = json.loads((tiny_model_dir / "summary.json").read_text())
    assert summary["seconds"] < 60
    clf = model.load(tiny_model_dir)
    cfg = clf.config["training"]
    # Score on held-out BBC documents the tiny run never saw (outside its 60-per-label sample).
    seen = set(cfg["split"]["train"]) | set(cfg["split"]["val"]) | set(cfg["split"]["test"])
    held_out = [d for d in load_bbc() if d.doc_id not in seen][::10]
    xs = [clf.encode(tokenize(d.text)) for d in held_out]
    ys = [clf.labels.index(d.label) for d in held_out]
    report = evaluate(clf.model, xs, ys, clf.labels)
    assert len(held_out) > 100
    assert report["accuracy"] >= 0.6, report  # chance is 0.2


def test_artifact_records_config_split_and_history(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architecture"]["hidden_size"] == 32
    assert config["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    tr = config["training"]
    assert tr["seed"] == 0 and tr["dataset"] == "bbc-news"
    assert len(tr["split"]["train"]) == 210 and len(tr["split"]["test"]) == 60
    assert tr["history"] and tr["best_epoch"] >= 1


def test_split_is_stratified_seeded_and_disjoint():
    docs = load_bbc()
    a, b, c = split(docs, seed=0), split(docs, seed=0), split(docs, seed=1)
    assert a.ids() == b.ids() and a.ids() != c.ids()
    ids = a.ids()
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == len(docs) == 2225
    for label in {d.label for d in docs}:
        n = sum(d.label == label for d in docs)
        n_test = sum(d.label == label for d in a.test)
        assert abs(n_test - 0.2 * n) <= 1
    assert abs(len(a.train) - 0.7 * len(docs)) <= 5


def test_eval_writes_report_and_plot(tiny_model_dir, tmp_path):
    import shutil

    from model.train import evaluate_artifact
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    report = evaluate_artifact(d)
    saved = json.loads((d / "eval.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"]
    assert set(saved["accuracy_at_prefix"]) == {"0.1", "0.25", "0.5", "0.75", "1"}
    assert len(saved["confusion_matrix"]) == 5
    assert sum(map(sum, saved["confusion_matrix"])) == len(saved["test_doc_ids"]) == 60
    assert 0 <= saved["macro_f1"] <= 1
    assert (d / "accuracy_vs_prefix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.heavy
def test_average_from_keeps_the_mean_of_the_epochs_weights(tmp_path):
    """With a schedule that does not depend on the run's length and no EMA, a 3-epoch run
    passes through the weights a 2-epoch run ends with (the same seed draws the same batches),
    so averaging from epoch 2 of 3 must give the mean of what the two runs end with."""
    import torch

    from model.train import TrainConfig, train

    from .fixtures import TINY
    base = {**TINY, "limit": 12, "epochs": 3, "patience": 3, "schedule": "const", "ema": 0.0}
    train(TrainConfig(**{**base, "epochs": 2, "average_from": 2}), tmp_path / "e2")
    train(TrainConfig(**{**base, "average_from": 3}), tmp_path / "e3")
    summary = train(TrainConfig(**{**base, "average_from": 2}), tmp_path / "mean")
    w2, w3, mean = (model.load(tmp_path / d).model.state_dict() for d in ("e2", "e3", "mean"))
    assert summary["best_epoch"] == 3
    assert not torch.equal(w2["head.weight"], w3["head.weight"])  # the epochs differ
    for name, value in mean.items():
        assert torch.allclose(value, (w2[name] + w3[name]) / 2, atol=1e-6), name
    best = train(TrainConfig(**{**base, "average_from": 0, "train_on_val": False}), tmp_path / "best")
    tr = json.loads((tmp_path / "best" / "config.json").read_text())["training"]
    assert tr["kept"] == "best" and best["best_epoch"] == tr["best_epoch"]


@pytest.mark.heavy
def test_averaging_keeps_the_bag_units_fixed_entries_exact(tmp_path):
    """A fixed entry (a bag unit's decay bias) is the same at every epoch's end, so the mean
    must give it back bit for bit, not within a rounding step."""
    import torch

    from model import bag
    from model.train import TrainConfig, train

    from .fixtures import TINY
    cfg = {**TINY, "limit": 12, "epochs": 6, "patience": 6, "average_from": 1, "bag_clock": False}
    train(TrainConfig(**cfg), tmp_path / "m")
    gru = model.load(tmp_path / "m").model.gru
    H, n = gru.hidden_size, cfg["bag_units"]
    want = torch.logit(torch.tensor([1 - 1 / t for t in bag.time_scales(
        n, cfg.get("bag_min_tokens", 8.0), cfg.get("bag_max_tokens", 400.0))])).float()
    assert torch.equal(gru.bias_ih_l0.detach()[2 * H - n:2 * H], want)


@pytest.mark.heavy
def test_mean_units_are_fitted_first_then_fixed(tmp_path):
    """The default recipe fits the mean units alone, then trains the GRU beside them with the
    table fixed: every epoch's weights, and the saved mean of them, carry the very table the
    fit gave (bit for bit), and the head's mean columns started from the fitted head."""
    import torch

    from model.train import TrainConfig, train

    from .fixtures import TINY
    tables = []
    cfg = {**TINY, "limit": 12, "epochs": 3, "patience": 3, "average_from": 1}
    train(TrainConfig(**cfg), tmp_path / "m",
          on_epoch=lambda epoch, m, vocab: tables.append(m.mean_embed.weight.detach().clone()))
    saved = model.load(tmp_path / "m").model
    assert saved.config.mean_dim == TrainConfig().mean_dim > 0
    assert len(tables) == 3 and all(torch.equal(t, tables[0]) for t in tables)
    assert torch.equal(saved.mean_embed.weight.detach(), tables[0])
    assert saved.mean_embed.weight.detach()[1:].abs().max() > 0.2  # fitted: init std is 0.1


@pytest.mark.heavy
def test_fitted_mean_units_alone_classify_their_training_texts():
    """The fit is a streamed linear bag-of-words classifier in its own right: the head's mean
    columns alone, GRU columns zeroed, read the training texts far above chance (0.2)."""
    import random

    import torch

    from model.gru import GRUClassifier, ModelConfig
    from model.tokenizer import Vocab
    from model.train import TrainConfig, fit_mean_units, split_of

    cfg = TrainConfig(limit=40, mean_epochs=30, max_train_tokens=400)
    torch.manual_seed(0)
    labels, sp = split_of(cfg)
    toks = [tokenize(d.text) for d in sp.train]
    vocab = Vocab.build(toks, min_freq=2)
    xs, ys = [vocab.encode(t) for t in toks], [labels.index(d.label) for d in sp.train]
    m = GRUClassifier(ModelConfig(len(vocab), len(labels), 8, 8, mean_dim=cfg.mean_dim))
    fit_mean_units(m, xs, ys, cfg, random.Random(0))
    assert not m.mean_embed.weight.requires_grad
    with torch.no_grad():
        m.head.weight[:, :8] = 0.0
    acc = evaluate(m, xs, ys, labels)["accuracy_at_fraction"]
    assert acc["1"] >= 0.9 and acc["0.25"] >= 0.8, acc


def test_mean_units_reject_a_fit_of_no_epochs(tmp_path):
    import pytest

    from model.train import TrainConfig, train
    with pytest.raises(ValueError, match="mean_epochs"):
        train(TrainConfig(limit=5, mean_dim=4, mean_epochs=0), tmp_path / "x")
    with pytest.raises(ValueError, match="carry_state"):
        train(TrainConfig(limit=5, carry_state=1), tmp_path / "y")


@pytest.mark.heavy
def test_validation_texts_are_trained_on_unless_held_out(tmp_path):
    """With weight averaging nothing is selected on the validation texts, so the default fits
    on train + val (the vocabulary is theirs, no epoch is scored on them); held out, the
    vocabulary is the training texts' alone and every epoch carries its validation score."""
    import pytest

    from model.tokenizer import Vocab
    from model.train import TrainConfig, split_of, train

    from .fixtures import TINY
    base = {**TINY, "limit": 12, "epochs": 2, "patience": 2, "average_from": 1}
    _, sp = split_of(TrainConfig(**base))
    vocab_of = lambda docs: Vocab.build([tokenize(d.text) for d in docs], min_freq=TINY["min_freq"]).itos
    assert vocab_of(sp.train + sp.val) != vocab_of(sp.train)  # the test can tell them apart
    for on_val, docs in ((True, sp.train + sp.val), (False, sp.train)):
        out = tmp_path / str(on_val)
        summary = train(TrainConfig(**{**base, "train_on_val": on_val}), out)
        clf = model.load(out)
        assert clf.vocab.itos == vocab_of(docs)
        history = clf.config["training"]["history"]
        assert all(("val" in row) is not on_val for row in history)
        assert (summary["val"] is None) is on_val
    with pytest.raises(ValueError, match="average_from"):
        train(TrainConfig(**{**base, "average_from": 0}), tmp_path / "x")
    with pytest.raises(ValueError, match="none"):
        train(TrainConfig(**{**base, "average_from": 3}), tmp_path / "y")
    with pytest.raises(ValueError, match="no validation texts"):  # 5 a label: none held out
        train(TrainConfig(**{**base, "limit": 5, "average_from": 0, "train_on_val": False}),
              tmp_path / "z")
