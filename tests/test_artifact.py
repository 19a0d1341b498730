import json
import shutil

import pytest
import torch

import model
from model.artifact import ArtifactError, load_safetensors, save_safetensors


def test_roundtrip_gives_identical_predictions(tiny_model_dir, tmp_path):
    clf = model.load(tiny_model_dir)
    model.artifact.save(tmp_path / "copy", clf.model, clf.vocab, clf.labels, clf.config["training"])
    again = model.load(tmp_path / "copy")
    assert again.model_id == clf.model_id
    tokens = "the chancellor raised interest rates as shares fell".split()
    assert again.classify(tokens) == clf.classify(tokens)
    probs = clf.classify(tokens)
    assert set(probs) == set(clf.labels) and abs(sum(probs.values()) - 1) < 1e-5


def test_safetensors_files_interoperate_with_the_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    save_safetensors(tensors, tmp_path / "ours.safetensors")
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(tensors[k], theirs[k]) for k in tensors)
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours = load_safetensors(tmp_path / "theirs.safetensors")
    assert all(torch.equal(tensors[k], ours[k]) for k in tensors)


@pytest.fixture
def copy_dir(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    return d


def _edit_config(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


def test_flipped_weight_byte_fails_the_content_hash(copy_dir):
    w = bytearray((copy_dir / "weights.safetensors").read_bytes())
    w[-3] ^= 0xFF
    (copy_dir / "weights.safetensors").write_bytes(bytes(w))
    with pytest.raises(ArtifactError, match="does not match the content hash"):
        model.load(copy_dir)


def test_truncated_weights_fail_clearly(copy_dir):
    raw = (copy_dir / "weights.safetensors").read_bytes()
    (copy_dir / "weights.safetensors").write_bytes(raw[:100])
    _edit_config(copy_dir, lambda c: c.update(model_id=model.artifact._model_id(
        copy_dir / "weights.safetensors", copy_dir / "vocab.json", c["architecture"])))
    with pytest.raises(ArtifactError, match="header length|offsets"):
        model.load(copy_dir)


def _edit_arch(d, **changes):
    def fn(c):
        c["architecture"].update(changes)
        c["model_id"] = model.artifact._model_id(d / "weights.safetensors", d / "vocab.json",
                                                 c["architecture"])
    _edit_config(d, fn)


def test_edited_architecture_fails_the_content_hash(copy_dir):
    _edit_config(copy_dir, lambda c: c["architecture"].update(head_activation="tanh"))
    with pytest.raises(ArtifactError, match="does not match the content hash"):
        model.load(copy_dir)


def test_shape_mismatch_names_the_tensor(copy_dir):
    _edit_arch(copy_dir, embed_dim=64)
    with pytest.raises(ArtifactError, match="tensor 'embed.weight' has shape"):
        model.load(copy_dir)


def test_vocab_size_mismatch(copy_dir):
    _edit_arch(copy_dir, vocab_size=7)
    with pytest.raises(ArtifactError, match="vocab_size=7"):
        model.load(copy_dir)


def test_missing_files_and_bad_json(copy_dir, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        model.load(tmp_path / "nothing")
    (copy_dir / "vocab.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        model.load(copy_dir)
    (copy_dir / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="has no weights.safetensors"):
        model.load(copy_dir)


def test_artifact_contains_no_pickle(tiny_model_dir):
    for f in tiny_model_dir.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
