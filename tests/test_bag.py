"""Bag units (model/bag.py): GRU units tied to running averages stay tied through training,
compute the average they claim, and keep the streaming invariant."""

from itertools import pairwise

import pytest
import torch

from model import bag
from model.gru import GRUClassifier, ModelConfig

pytestmark = pytest.mark.unit

H, N = 16, 6


def make(clock: bool, seed: int = 0) -> GRUClassifier:
    torch.manual_seed(seed)
    m = GRUClassifier(ModelConfig(vocab_size=40, num_labels=3, embed_dim=8, hidden_size=H))
    bag.tie(m.gru, N, 4.0, 100.0, clock=clock)
    return m


def train_a_little(m: GRUClassifier, steps: int = 8) -> None:
    opt = torch.optim.AdamW(m.parameters(), lr=3e-2, weight_decay=0.0)
    ids, y = torch.randint(2, 40, (6, 25)), torch.randint(0, 3, (6,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(m(ids)[:, -1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_time_scales_are_geometric_between_the_bounds():
    ts = bag.time_scales(5, 4.0, 64.0)
    assert ts[0] == pytest.approx(4.0) and ts[-1] == pytest.approx(64.0)
    assert all(b / a == pytest.approx(2.0) for a, b in pairwise(ts))


@pytest.mark.parametrize("clock", [False, True])
def test_tied_entries_stay_tied_through_training(clock):
    m = make(clock)
    before = {k: v.clone() for k, v in m.gru.state_dict().items()}
    train_a_little(m)
    w_hh, w_ih = m.gru.weight_hh_l0, m.gru.weight_ih_l0
    units = list(range(H - N, H))
    free = [c for c in range(H) if not (clock and c == H - N)]  # the clock column may learn
    for u in units:
        assert torch.all(w_hh[u] == 0) and torch.all(w_hh[2 * H + u] == 0)  # r, n: no recurrence
        assert torch.all(w_hh[H + u, free] == 0)  # z reads nothing but (maybe) the clock
        assert torch.all(w_ih[u] == 0) and torch.all(w_ih[H + u] == 0)  # r, z: no input
    # the free units and the bag units' token values did learn
    assert not torch.equal(before["weight_hh_l0"][: H - N], w_hh[: H - N])
    assert not torch.equal(before["weight_ih_l0"][2 * H + H - N + 1:], w_ih[2 * H + H - N + 1:])
    if not clock:
        assert bag.decays_of(m.gru, N) == pytest.approx([1 - 1 / t for t in bag.time_scales(N, 4, 100)])


def test_a_bag_unit_is_the_running_average_it_claims():
    """Without a clock, unit u holds (1 - d) * sum_i d^(t-i) * tanh(W_n x_i + b_n)."""
    m = make(clock=False).eval()
    ids = torch.randint(2, 40, (1, 30))
    with torch.no_grad():
        _, h = m.gru(m.embed(ids))
        x = m.embed(ids)[0]  # (T, E)
        top = 0
        W_n = m.gru.weight_ih_l0[2 * H:][H - N:]
        b_n = m.gru.bias_ih_l0[2 * H:][H - N:]
        values = torch.tanh(x @ W_n.t() + b_n)  # (T, N)
        d = torch.tensor(bag.decays_of(m.gru, N))
        avg = torch.zeros(N)
        for v in values:
            avg = d * avg + (1 - d) * v
    assert torch.allclose(h[top, 0, H - N:], avg, atol=1e-5)


@pytest.mark.parametrize("clock", [False, True])
def test_streaming_step_equals_forward_with_bag_units(clock):
    m = make(clock)
    train_a_little(m)
    m.eval()
    m.prepare_streaming()
    ids = torch.randint(2, 40, (3, 37))
    with torch.no_grad():
        full = torch.softmax(m(ids), -1)[:, -1]
    h = m.initial_state(3)
    for a in range(0, 37, 5):
        k = min(5, 37 - a)
        h, probs = m.step(h, ids[:, a:a + k], torch.full((3,), k))
    assert torch.allclose(probs, full, atol=1e-5)


def test_the_training_cli_reads_booleans_strictly():
    """``--bag-clock false`` must turn the clock off (a plain ``str`` would be truthy)."""
    import argparse

    from model.__main__ import _boolean
    assert _boolean("false") is False and _boolean("True") is True and _boolean("0") is False
    with pytest.raises(argparse.ArgumentTypeError):
        _boolean("maybe")
