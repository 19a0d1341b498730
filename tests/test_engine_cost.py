"""Tier 1: a batch costs what it holds (issue 26, F1 and F7), measured in this process.

The model has the default recipe's shape (embed 256, GRU 160, 32 mean units, 20,000 tokens)
with random weights: cost does not depend on the weights. Every figure is compared with a
baseline measured here, in the same process, best of three (the box may be shared).

* F1: one 4,096-token record among 511 one-token messages used to pad every message to
  4,096 steps (+4.1 GB peak RSS, 3.1 s at best and 15 s the first time, against 5 ms for 512
  one-token messages and 77 ms for the record alone); now 82 ms and +0 MB.
* F7: 512 messages of one session used to take a model step each, in sequence (119 ms
  against 4 ms for the same messages over 512 sessions; the recurrence alone takes 9); now
  12 ms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.gru import GRUClassifier, ModelConfig
from worker.engine import Engine
from worker.messages import TokenMessage
from worker.ports import Record

from .peak import MB, Cost, measure

pytestmark = pytest.mark.unit

VOCAB = 20_000


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the worker's default (GRU_MODEL__THREADS)
    model = GRUClassifier(ModelConfig(VOCAB, 5, embed_dim=256, hidden_size=160, mean_dim=32))
    return Engine(model.eval())


def msg(sid: str, seq: int, ids: list[int], offset: int) -> TokenMessage:
    return TokenMessage(sid, seq, ids, False, Record("t", 0, offset, sid.encode(), b"", 0))


def tokens(rng, n: int) -> list[int]:
    return rng.integers(2, VOCAB, n).tolist()


def best(engine: Engine, batch: list[TokenMessage], n: int = 3) -> Cost:
    """Of ``n`` runs (fresh sessions: nothing loaded) after one warm-up, untraced (tracemalloc
    slows Python code): the shortest time and the largest RSS growth; then tracemalloc's peak
    in one more run."""
    engine.apply(batch, {})
    costs = [measure(lambda: engine.apply(batch, {}), trace=False) for _ in range(n)]
    traced = measure(lambda: engine.apply(batch, {}))
    for c in (*costs, traced):
        assert c.error is None, c.error
    return Cost(min(c.seconds for c in costs), max(c.rss_growth for c in costs),
                traced.traced_peak, None)


def test_a_long_record_costs_its_own_tokens_not_the_whole_batch_padded(engine):
    """F1: the batch of 511 one-token messages and one 4,096-token record costs about the
    uniform batch plus that record alone, in time and in memory."""
    rng = np.random.default_rng(0)
    uniform = [msg(f"u{i}", 0, tokens(rng, 1), i) for i in range(512)]
    long = msg("long", 0, tokens(rng, 4096), 511)
    mixed = uniform[:511] + [long]
    base, alone, cost = best(engine, uniform), best(engine, [long]), best(engine, mixed)
    print(f"\nuniform: {base}\nlong record alone: {alone}\nmixed: {cost}\n"
          f"mixed / uniform: {cost.seconds / base.seconds:.1f}x time")
    assert cost.rss_growth <= base.rss_growth + 64 * MB, (cost, base)
    assert cost.traced_peak <= base.traced_peak + 4 * MB, (cost, base)
    assert cost.seconds <= 2 * (base.seconds + alone.seconds), (cost, base, alone)


def test_many_messages_of_one_session_run_as_one_sequence(engine):
    """F7: 512 one-token messages of one session cost what the same messages over 512
    sessions cost, plus the recurrence they need: a GRU's steps over one sequence are
    sequential (512 steps of one row, not one step of 512 rows), so that floor is measured
    too, as the model's own time loop over the 512 tokens. Each prediction equals the
    offline model's at its position."""
    rng = np.random.default_rng(1)
    ids = tokens(rng, 512)
    one = [msg("one", i, [t], i) for i, t in enumerate(ids)]
    spread = [msg(f"s{i}", 0, [t], i) for i, t in enumerate(ids)]
    model = engine.stepper.model
    with torch.inference_mode():
        x = model.embed(torch.tensor([ids]))
        floor = min(measure(lambda: model.gru(x), trace=False).seconds for _ in range(3))
    base, cost = best(engine, spread), best(engine, one)
    print(f"\nspread over 512 sessions: {base}\none session: {cost}\n"
          f"the recurrence alone: {floor * 1000:.1f} ms\n"
          f"one / spread: {cost.seconds / base.seconds:.1f}x time")
    assert cost.seconds <= 2 * (base.seconds + floor), (cost, base, floor)
    assert cost.rss_growth <= base.rss_growth + 16 * MB, (cost, base)

    res = engine.apply(one, {})
    got = np.array([p.probs for p in res.updates[0].predictions])
    with torch.inference_mode():
        want = torch.softmax(model(torch.tensor([ids])), -1)[0].numpy()
    assert np.abs(got - want).max() <= 1e-5
