"""Tier 1: the batch latency budget (worker/budget.py) as a pure function of measurements."""

from __future__ import annotations

import random

import pytest

from worker.budget import BatchBudget

pytestmark = pytest.mark.unit


def trained(target_s=0.02, max_records=4096, fixed=0.002, per_msg=50e-6, per_session=0.0,
            ratio=1.0, batches=60, seed=0, noise=0.0) -> BatchBudget:
    rng = random.Random(seed)
    b = BatchBudget(target_s, max_records)
    for _ in range(batches):
        n = rng.randint(1, 600)
        s = max(1, int(n * ratio))
        t = fixed + per_msg * n + per_session * s
        b.observe(n, s, t * (1 + rng.uniform(-noise, noise)))
    return b


def test_the_fit_recovers_fixed_and_marginal_costs():
    b = trained(noise=0.05)
    assert b.fixed_s == pytest.approx(0.002, rel=0.25)
    assert b.per_message_s == pytest.approx(50e-6, rel=0.05)


def test_a_batch_takes_what_fits_the_budget():
    lim = trained().limit(waiting=0)
    assert lim.reason == "budget"
    assert lim.records == pytest.approx((0.02 - 0.002) / 50e-6, rel=0.02)  # 360
    assert trained(max_records=100).limit(0).records == 100  # never past max_records


def test_a_backlog_of_more_than_two_budgeted_batches_lifts_the_limit():
    b = trained()
    n = b.limit(0).records
    assert b.limit(2 * n).reason == "budget"
    lifted = b.limit(2 * n + 1)
    assert (lifted.records, lifted.reason) == (4096, "backlog")
    assert b.limit(None).reason == "budget"  # lag unknown: stay within the budget


def test_per_session_cost_counts_at_the_recent_sessions_per_message():
    """The same per-session cost allows more messages per batch when few sessions share them."""
    many = trained(per_msg=20e-6, per_session=40e-6, ratio=1.0).limit(0).records
    few = trained(per_msg=20e-6, per_session=40e-6, ratio=0.25).limit(0).records
    assert many == pytest.approx(0.018 / 60e-6, rel=0.05)
    assert few == pytest.approx(0.018 / 30e-6, rel=0.05)


def test_the_limit_follows_a_change_in_cost():
    b = trained(per_msg=50e-6)
    before = b.limit(0).records
    rng = random.Random(1)
    for _ in range(200):  # the machine got twice as slow
        n = rng.randint(1, 600)
        b.observe(n, n, 0.002 + 100e-6 * n)
    assert b.limit(0).records == pytest.approx(before / 2, rel=0.1)


def test_warmup_starts_small_and_doubles():
    b = BatchBudget(0.02, 512, min_records=16, warmup_batches=4)
    seen = []
    for _ in range(4):
        lim = b.limit(0)
        seen.append((lim.records, lim.reason))
        b.observe(lim.records, lim.records, 0.001)
    assert seen == [(16, "warmup"), (32, "warmup"), (64, "warmup"), (128, "warmup")]
    assert b.limit(0).reason != "warmup"


def test_off_and_impossible_budgets():
    assert BatchBudget(0, 777).limit(0).records == 777  # 0: off
    slow = trained(target_s=0.001, fixed=0.002)  # the fixed cost alone passes the budget
    assert slow.limit(0).records == slow.min_records


def mixed(batches=120, seed=0, fixed=0.002, per_msg=20e-6, per_token=3e-6, per_step=20e-6,
          doc_share=0.01, doc_tokens=(500, 4096)) -> tuple[BatchBudget, list]:
    """Batches of chat lines (4-16 tokens) with a share of long documents: each batch's time
    is its tokens (spread over sessions) plus its longest sequence's steps (sequential)."""
    rng = random.Random(seed)
    b = BatchBudget(0.2, 4096)
    seen = []
    for _ in range(batches):
        n = rng.randint(16, 512)
        lengths = [rng.randint(*doc_tokens) if rng.random() < doc_share else rng.randint(4, 16)
                   for _ in range(n)]
        tokens, longest = sum(lengths), max(lengths)
        t = fixed + per_msg * n + per_token * tokens + per_step * longest
        b.observe(n, n, t, tokens, longest)
        seen.append((n, tokens, longest, t))
    return b, seen


def test_the_fit_predicts_a_batch_from_its_tokens_and_its_longest_sequence():
    """A batch with a 4,096-token document costs its 4,096 sequential steps, not 4,096
    tokens at the batched rate: the fit tells the two apart, and predicts both kinds."""
    b, _ = mixed()
    assert b.per_token_s == pytest.approx(3e-6, rel=0.05)
    assert b.per_step_s == pytest.approx(20e-6, rel=0.05)
    chat = 0.002 + 20e-6 * 512 + 3e-6 * 512 * 10 + 20e-6 * 16
    assert b.predict(512, tokens=5120, sessions=512, longest=16) == pytest.approx(chat, rel=0.05)
    with_doc = chat + 3e-6 * 4080 + 20e-6 * 4080
    assert b.predict(512, tokens=5120 + 4080, sessions=512, longest=4096) == \
        pytest.approx(with_doc, rel=0.05)


def test_the_limit_leaves_room_for_the_recent_longest_sequence():
    """The same per-token costs allow fewer records where long documents keep arriving: the
    room is the budget less the fixed cost and the steps of the recent longest sequence."""
    chat, _ = mixed(doc_share=0.0)
    docs, _ = mixed(doc_share=0.02)
    assert docs.limit(0).records < chat.limit(0).records
    room = 0.2 - docs.fixed_s - docs.per_step_s * docs._longest
    assert docs.limit(0).records == pytest.approx(room / docs.per_message_s, rel=0.02)
    assert docs.predict(docs.limit(0).records) == pytest.approx(0.2, rel=0.02)
