"""The streaming invariant: folding ``step`` over any chunking equals ``forward``."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model.gru import GRUClassifier, ModelConfig

pytestmark = pytest.mark.unit

TOL = 1e-5


def make_model(layers=1, seed=0, vocab=50, hidden=16, mean=0):
    torch.manual_seed(seed)
    return GRUClassifier(ModelConfig(vocab_size=vocab, num_labels=4, embed_dim=8,
                                     hidden_size=hidden, num_layers=layers, mean_dim=mean)).eval()


def full_run(model, ids):
    """Reference: forward over the whole text, plus the final state of every layer: the GRU's
    h and, with mean units, the top layer's mean of the tokens' mean vectors and their count
    (computed here directly, not through forward)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)
        _, h = model.gru(model.embed(x))
        if model.config.mean_dim:
            tail = torch.zeros(h.shape[0], 1, model.config.mean_dim + 1)
            tail[-1, 0, :-1] = model.mean_embed(x)[0].double().mean(0).float()
            tail[-1, 0, -1] = len(ids)
            h = torch.cat([h, tail], -1)
    return torch.softmax(logits[0, -1], -1), h[:, 0]


def chunk(ids, cuts):
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(ids))), len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(2, 49), min_size=1, max_size=80),
       cuts=st.lists(st.integers(1, 79), max_size=10),
       layers=st.integers(1, 2), prepared=st.booleans(), mean=st.sampled_from([0, 3]))
def test_folding_step_over_chunks_equals_forward(ids, cuts, layers, prepared, mean):
    """Chunks of up to 32 tokens take the unrolled step (with or without the precomputed
    input table), longer ones the fused nn.GRU loop: all must agree with forward, mean units
    or not."""
    model = make_model(layers, mean=mean)
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
       seed=st.integers(0, 1000), mean=st.sampled_from([0, 3]))
def test_batched_step_interleaves_sessions_like_separate_runs(texts, seed, mean):
    """Many sessions advanced together, each in its own random chunks, padded in one batch."""
    model = make_model(2, mean=mean)
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
    """The unrolled step and the packed time loop (for rows past UNROLL_MAX_TOKENS) compute
    the same function."""
    import numpy as np

    from model.gru import UNROLL_MAX_TOKENS
    model = make_model(2)
    model.prepare_streaming()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 16, generator=g)
    lengths = torch.tensor([UNROLL_MAX_TOKENS, 3, 0, 17])
    ids = torch.randint(2, 50, (4, UNROLL_MAX_TOKENS), generator=g) * (
        torch.arange(UNROLL_MAX_TOKENS)[None, :] < lengths[:, None])
    unrolled = model._step_unrolled(h, ids, lengths)
    lens = lengths.numpy()
    starts = np.concatenate([[0], np.cumsum(lens)])
    real = torch.arange(UNROLL_MAX_TOKENS)[None, :] < lengths[:, None]
    packed, _ = model._advance_packed(h, ids[real], lens, starts, np.arange(4), lens)
    assert (unrolled - packed).abs().max() <= TOL


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), layers=st.integers(1, 2), mean=st.sampled_from([0, 3]),
       long=st.booleans(), window=st.sampled_from([5, 64, 8192]))
def test_advance_equals_stepping_token_by_token(seed, layers, mean, long, window):
    """``advance`` (several rows, each read at several points, in time windows) gives the
    states and probabilities of stepping each row one token at a time."""
    import numpy as np

    import model.gru as gru
    model = make_model(layers, mean=mean)
    model.prepare_streaming()
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 5))
    lens = rng.integers(0, 90 if long else 20, B)
    rows = [rng.integers(1, 50, n).tolist() for n in lens]
    h0 = model.initial_state(B)
    h0[:, :, :16] = torch.randn(layers, B, 16)
    if mean:
        h0[-1, :, 16:19] = torch.randn(B, 3)
        h0[-1, :, 19] = torch.from_numpy(rng.integers(0, 40, B).astype(np.float32))
    reads = [(b, int(t)) for b in range(B)
             for t in sorted({*rng.integers(0, lens[b] + 1, 3).tolist(), int(lens[b])})]
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    saved, gru.WINDOW_TOKENS = gru.WINDOW_TOKENS, window
    try:
        h_new, probs = model.advance(h0, flat, torch.tensor(lens), torch.tensor([r for r, _ in reads]),
                                     torch.tensor([t for _, t in reads]))
    finally:
        gru.WINDOW_TOKENS = saved
    for b in range(B):
        h = h0[:, b:b + 1]
        want = {0: model.step(h, torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))[1][0]}
        for t, tok in enumerate(rows[b]):
            h, p = model.step(h, torch.tensor([[tok]]), torch.tensor([1]))
            want[t + 1] = p[0]
        assert (h[:, 0] - h_new[:, b]).abs().max() <= TOL
        for i, (rb, t) in enumerate(reads):
            if rb == b:
                assert (probs[i] - want[t]).abs().max() <= TOL


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


def test_advance_does_not_mutate_its_input_state():
    """Rows of mixed lengths run longest first, in place on a copy: the caller's state is
    left as it was, whatever the order of the rows."""
    model = make_model(2, mean=3)
    model.prepare_streaming()
    h = torch.randn(2, 3, 20)
    before = h.clone()
    flat = torch.tensor([3, 4, 5, 6, 7, 8])
    model.advance(h, flat, torch.tensor([1, 0, 5]), torch.tensor([0, 2, 2]), torch.tensor([1, 2, 5]))
    assert torch.equal(h, before)


def test_mean_units_state_layout_and_static_step():
    """With mean units the state is (L, B, H + M + 1): the top layer carries the running mean
    and the token count, lower layers zeros there; step_static (the CUDA-graph path) agrees."""
    model = make_model(2, mean=3)
    assert model.config.state_size == 16 + 3 + 1
    h = model.initial_state(2)
    assert h.shape == (2, 2, 20)
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    h1, p1 = model.step(h, ids, torch.tensor([3, 1]))
    h2, p2 = model.step_static(h, ids, torch.tensor([3, 1]))
    assert (h1 - h2).abs().max() <= TOL and (p1 - p2).abs().max() <= TOL
    assert h1[-1, :, -1].tolist() == [3.0, 1.0]
    assert torch.equal(h1[0, :, 16:], torch.zeros(2, 4))
    means = model.mean_embed(ids).detach()
    assert torch.allclose(h1[-1, 0, 16:19], means[0].mean(0), atol=TOL)
    assert torch.allclose(h1[-1, 1, 16:19], means[1, 0], atol=TOL)


def test_mean_units_forward_from_a_state_continues_the_mean():
    """forward(h0=state) goes on from a state, as a worker restored from Redis would."""
    model = make_model(1, mean=3)
    ids = torch.randint(2, 50, (2, 30))
    with torch.no_grad():
        whole = model(ids)
        h, _ = model.step(model.initial_state(2), ids[:, :11], torch.tensor([11, 11]))
        rest = model(ids[:, 11:], h0=h)
    assert (rest - whole[:, 11:]).abs().max() <= TOL


def test_mean_units_stay_exact_over_a_long_stream():
    """A million tokens in 1,000-token messages: the convex update keeps the mean within
    float32's reach of the exact one (no drift from re-multiplying by the count)."""
    model = make_model(1, mean=3, vocab=50)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (1000, 1000), generator=g)
    h = model.initial_state(1)
    sums = torch.zeros(3, dtype=torch.float64)
    table = model.mean_embed.weight.detach().double()
    for row in ids:
        h = model._step_mean(h, h[..., :16], row[None, :], torch.tensor([1000]))
        sums += table[row].sum(0)
    assert h[-1, 0, -1].item() == 1_000_000
    assert (h[-1, 0, 16:19].double() - sums / 1_000_000).abs().max() <= 1e-5


def test_mean_units_survive_a_float16_count_overflow():
    """A float16 state holds counts to 65,504: past that the stored count is inf. The step
    must then keep the mean as it is (a token would move it by under 1/65,504), never NaN."""
    model = make_model(1, mean=3)
    h = model.initial_state(1)
    h[-1, 0, 16:19] = torch.tensor([0.25, -0.5, 0.125])
    h[-1, 0, 19] = torch.tensor(70_000.0).half().float()  # inf, as a float16 state reads back
    assert h[-1, 0, 19].isinf()
    h2, probs = model.step(h, torch.tensor([[5, 6]]), torch.tensor([2]))
    assert torch.equal(h2[-1, 0, 16:19], h[-1, 0, 16:19])
    assert torch.isfinite(probs).all()
