import json
import re
import shutil

import pytest
import torch

import model
from model.artifact import ArtifactError, load_safetensors, save_safetensors

pytestmark = pytest.mark.unit


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


# --- crafted artifacts fail before anything large is allocated (issue 26, F4) ---------------

def _crafted(d, hidden_size: int, weights_header: dict | None = None, vocab_size: int = 3):
    """An artifact whose config is consistent (its model_id is the true content hash) but
    whose weights file holds only ``weights_header``: what an attacker can write in 300 bytes."""
    import struct
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(["<pad>", "<unk>", *"abcdefgh"][:vocab_size]))
    head = json.dumps(weights_header or {}).encode()
    head += b" " * (-len(head) % 8)
    (d / "weights.safetensors").write_bytes(struct.pack("<Q", len(head)) + head)
    arch = {"type": "gru_classifier", "vocab_size": vocab_size, "num_labels": 2,
            "embed_dim": 16, "hidden_size": hidden_size, "num_layers": 1, "dropout": 0.0,
            "head_hidden": 0, "head_activation": "relu", "mean_dim": 0}
    config = {"format_version": 1, "architecture": arch, "labels": ["x", "y"],
              "model_id": model.artifact._model_id(d / "weights.safetensors",
                                                   d / "vocab.json", arch)}
    (d / "config.json").write_text(json.dumps(config, separators=(",", ":")))
    return d


def _fails_fast(d, match: str, **kw):
    from .peak import measure
    cost = measure(lambda: model.load(d, **kw))
    print(cost)
    assert isinstance(cost.error, ArtifactError), cost.error
    assert re.search(match, str(cost.error)) and "\n" not in str(cost.error), str(cost.error)
    assert cost.seconds < 0.5, cost
    assert cost.rss_growth < 32 * 2**20 and cost.traced_peak < 4 * 2**20, cost
    return cost


def test_a_300_byte_config_declaring_a_huge_model_fails_in_milliseconds(tmp_path):
    d = _crafted(tmp_path / "huge", hidden_size=12_000)
    assert (d / "config.json").stat().st_size < 400
    _fails_fast(d, r"432,672,050 parameters, over the limit of 100,000,000 "
                   r"\(GRU_MODEL__MAX_PARAMETERS\)")


def test_a_model_under_the_limit_without_its_weights_fails_before_it_is_built(tmp_path):
    # 48M parameters: within the limit, so only the weights file's header can refuse it.
    d = _crafted(tmp_path / "big", hidden_size=4_000)
    _fails_fast(d, r"weights missing \['embed.weight', 'gru.bias_hh_l0'")


def test_a_header_declaring_a_huge_tensor_fails_on_the_file_size(tmp_path):
    header = {"embed.weight": {"dtype": "F32", "shape": [1_000_000, 1_000_000],
                               "data_offsets": [0, 4 * 10**12]}}
    d = _crafted(tmp_path / "lying", hidden_size=8, weights_header=header)
    _fails_fast(d, r"tensor 'embed.weight' offsets 0:4000000000000 do not match")


def test_oversized_files_are_refused_unread(copy_dir):
    with open(copy_dir / "config.json", "ab") as f:
        f.truncate(2 * 2**20)  # sparse: 2 MB on paper, nothing written
    _fails_fast(copy_dir, r"config.json: 2,097,152 bytes, over the limit of 1,048,576")


def test_the_parameter_limit_is_a_setting(tiny_model_dir):
    n = sum(t.numel() for t in model.load(tiny_model_dir).model.state_dict().values())
    assert model.load(tiny_model_dir, max_parameters=n).model_id
    with pytest.raises(ArtifactError, match=f"{n:,} parameters, over the limit of {n - 1:,}"):
        model.load(tiny_model_dir, max_parameters=n - 1)


@pytest.mark.parametrize("options", [{}, {"num_layers": 3}, {"mean_dim": 8},
                                     {"head_hidden": 12, "head_activation": "tanh"},
                                     {"num_layers": 2, "mean_dim": 4, "head_hidden": 6}])
def test_declared_shapes_are_the_built_models(options):
    from model.artifact import declared_shapes
    config = model.ModelConfig(vocab_size=11, num_labels=3, embed_dim=5, hidden_size=7,
                               **options)
    built = {k: tuple(v.shape) for k, v in model.GRUClassifier(config).state_dict().items()}
    assert declared_shapes(config) == built


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("hidden_size", "12"),
                                         ("num_layers", True), ("dropout", 2.0),
                                         ("head_activation", ["relu"])])
def test_ill_typed_architecture_fields_are_named(copy_dir, field, value):
    _edit_arch(copy_dir, **{field: value})
    with pytest.raises(ArtifactError, match=f"architecture.{field}="):
        model.load(copy_dir)
