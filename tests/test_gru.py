"""The streaming invariant: folding ``step`` over any chunking equals ``forward``."""

import torch
from hypothesis import given, settings, strategies as st

from model.gru import GRUClassifier, ModelConfig

TOL = 1e-5


def make_model(layers=1, seed=0, vocab=50, hidden=16):
    torch.manual_seed(seed)
    return GRUClassifier(ModelConfig(vocab_size=vocab, num_labels=4, embed_dim=8,
                                     hidden_size=hidden, num_layers=layers)).eval()


def full_run(model, ids):
    """Reference: forward over the whole text, plus the final h of every layer."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)
        _, h = model.gru(model.embed(x))
    return torch.softmax(logits[0, -1], -1), h[:, 0]


def chunk(ids, cuts):
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(ids))), len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(2, 49), min_size=1, max_size=80),
       cuts=st.lists(st.integers(1, 79), max_size=10),
       layers=st.integers(1, 2), prepared=st.booleans())
def test_folding_step_over_chunks_equals_forward(ids, cuts, layers, prepared):
    """Chunks of up to 32 tokens take the unrolled step (with or without the precomputed
    input table), longer ones the fused nn.GRU loop: all must agree with forward."""
    model = make_model(layers)
    if prepared:
        model.prepare_streaming()
    h = model.initial_state(1)
    for part in chunk(ids, cuts):
        h, probs = model.step(h, torch.tensor([part]), torch.tensor([len(part)]))
    ref_probs, ref_h = full_run(model, ids)
    assert (probs[0] - ref_probs).abs().max() <= TOL
    assert (h[:, 0] - ref_h).abs().max() <= TOL


@settings(max_examples=15, deadline=None)
@given(texts=st.lists(st.lists(st.integers(2, 49), min_size=1, max_size=30), min_size=2, max_size=6),
       seed=st.integers(0, 1000))
def test_batched_step_interleaves_sessions_like_separate_runs(texts, seed):
    """Many sessions advanced together, each in its own random chunks, padded in one batch."""
    model = make_model(2)
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for ids in texts:
        cuts = torch.randint(1, 30, (3,), generator=g).tolist()
        chunks.append(chunk(ids, cuts))
    h = model.initial_state(len(texts))
    last = [None] * len(texts)
    for r in range(max(len(c) for c in chunks)):
        parts = [c[r] if r < len(c) else [] for c in chunks]
        k = max(1, max(len(p) for p in parts))
        ids = torch.zeros(len(parts), k, dtype=torch.long)
        for i, p in enumerate(parts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        h, probs = model.step(h, ids, torch.tensor([len(p) for p in parts]))
        for i, p in enumerate(parts):
            if p:
                last[i] = probs[i]
    for i, ids in enumerate(texts):
        ref_probs, ref_h = full_run(model, ids)
        assert (last[i] - ref_probs).abs().max() <= TOL
        assert (h[:, i] - ref_h).abs().max() <= TOL


def test_both_step_paths_agree_on_a_mixed_batch():
    from model.gru import UNROLL_MAX_TOKENS
    model = make_model(2)
    model.prepare_streaming()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 16, generator=g)
    lengths = torch.tensor([UNROLL_MAX_TOKENS, 3, 0, 17])
    ids = torch.randint(2, 50, (4, UNROLL_MAX_TOKENS), generator=g) * (
        torch.arange(UNROLL_MAX_TOKENS)[None, :] < lengths[:, None])
    unrolled = model._step_unrolled(h, ids, lengths)
    fused = model._step_fused(h, ids, lengths)
    assert (unrolled - fused).abs().max() <= TOL


def test_zero_length_rows_keep_their_state():
    model = make_model()
    h = torch.randn(1, 3, 16)
    ids = torch.tensor([[5, 6], [0, 0], [7, 0]])
    h2, probs = model.step(h, ids, torch.tensor([2, 0, 1]))
    assert torch.equal(h2[:, 1], h[:, 1])
    assert not torch.equal(h2[:, 0], h[:, 0])
    assert probs.shape == (3, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_step_does_not_mutate_its_input_state():
    model = make_model()
    h = torch.randn(1, 2, 16)
    before = h.clone()
    model.step(h, torch.tensor([[3, 4], [5, 0]]), torch.tensor([2, 1]))
    assert torch.equal(h, before)
