import pytest
from hypothesis import given, strategies as st

from model.tokenizer import PAD, UNK, UNK_ID, Vocab, tokenize

pytestmark = pytest.mark.unit


def test_tokenize_lowercases_and_splits_words_and_numbers():
    assert tokenize("Hello, World! It's 2025 -- e-mail costs $1.13bn.") == [
        "hello", "world", "it's", "2025", "e-mail", "costs", "1", "13bn"]


def test_tokenize_empty_and_punctuation_only():
    assert tokenize("") == []
    assert tokenize(" ... !!! --- ") == []


@given(st.text(max_size=200))
def test_tokenize_is_deterministic_and_idempotent(text):
    toks = tokenize(text)
    assert toks == tokenize(text)
    assert tokenize(" ".join(toks)) == toks
    assert all(t == t.lower() and t for t in toks)


def test_vocab_reserves_pad_unk_and_respects_min_freq():
    v = Vocab.build([["a", "b", "a"], ["c", "a", "b"]], min_freq=2)
    assert v.itos == (PAD, UNK, "a", "b")
    assert v.encode(["a", "c", "zzz", "b"]) == [2, UNK_ID, UNK_ID, 3]
    assert v.decode([2, 3]) == ["a", "b"]


def test_vocab_ties_break_alphabetically_and_max_size():
    v = Vocab.build([["z", "y", "x", "x"]], min_freq=1, max_size=4)
    assert v.itos == (PAD, UNK, "x", "y")


def test_vocab_rejects_bad_lists():
    import pytest
    with pytest.raises(ValueError, match="must start"):
        Vocab(("a", PAD, UNK))
    with pytest.raises(ValueError, match="duplicate"):
        Vocab((PAD, UNK, "a", "a"))
