"""Fault injection with real processes: worker subprocesses, tansu and a private redis-server.

Each scenario injects faults while a paced producer streams interleaved BBC sessions, then
checks the oracle (``faults_support.check_oracle``) on what users see: every session's state
in Redis and its last prediction equal the model run offline over the session's full token
list (max abs diff <= 1e-5), and every (session, seq) produced has at least one prediction.
Results are written up in docs/reliability.md. Run: ``pytest tests/test_faults.py -m services``.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
import warnings

import numpy as np
import pytest

import model
from worker.codec import decode_state

from devtools.services import wait_for

from .faults_support import Cluster, check_oracle, expected_from, offline
from .streams import bbc_sessions, interleave

pytestmark = [pytest.mark.services, pytest.mark.heavy]  # worker subprocesses

FAST = {"GRU_BATCH__MAX_RECORDS": "64"}  # small batches: more batch boundaries to crash at


@pytest.fixture
def cluster(tiny_model_dir, kafka_client):
    with Cluster(tiny_model_dir, client=kafka_client) as c:
        yield c


def report(name: str, **numbers) -> None:
    print(f"\n[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def stream(n_sessions: int, seed: int, max_tokens: int = 150, max_chunk: int = 25, end=False):
    sessions = bbc_sessions(n_sessions, seed=seed, max_chunk=max_chunk, max_tokens=max_tokens,
                            prefix=f"x{seed}-")
    return sessions, interleave(sessions, seed=seed, end=end)


def finish(cluster, pairs, feeder, timeout: float = 90.0):
    feeder.finish()
    expected = expected_from(pairs)
    want = {(sid, s) for sid, e in expected.items() for s in e.seqs}
    cluster.wait_predictions(want, timeout)
    return expected


def finish_or_heal(cluster, pairs, feeder, workers, wait: float = 40.0):
    """Like ``finish``, for the scenarios with several group members. tansu 0.6.0's group
    coordinator can livelock a group after members leave or re-join out of phase (every
    member loops "SyncGroup failed due to coordinator rebalance", nothing is consumed; see
    docs/reliability.md). If that happens, every worker is stopped and one worker in a fresh
    consumer group replays the topic from the start: the dedupe must then absorb a full
    replay on top of the faults. Returns (expected, healed)."""
    feeder.finish()
    expected = expected_from(pairs)
    want = {(sid, s) for sid, e in expected.items() for s in e.seqs}
    try:
        cluster.wait_predictions(want, wait)
        return expected, False
    except AssertionError:
        pass
    for w in workers:
        w.kill()
    # A fresh Kafka group escapes tansu's livelock; the same state namespace keeps it on the
    # group's states and fencing tokens, so the replay must be absorbed as duplicates.
    cluster.worker("healer", env={**FAST, "GRU_STATE__NAMESPACE": cluster.names["group"]},
                   args=["--group", cluster.names["group"] + "-heal"])
    cluster.wait_predictions(want, 90)
    return expected, True


# --- 1. random crashes -------------------------------------------------------------------

@pytest.mark.slow
def test_random_sigkills_mid_stream(cluster, tiny_model_dir):
    rng = random.Random(1)
    sessions, pairs = stream(30, seed=101)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=24)
    kills = 0
    while kills < 3 or (kills < 5 and feeder.progress() < 0.9):  # a restart takes ~6 s
        time.sleep(rng.uniform(0.3, 2.0))  # a random point while the worker holds partitions
        w.kill()
        kills += 1
        w.start()
        w.wait_ready()
    expected = finish(cluster, pairs, feeder)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    report("random crashes", kills=kills, messages=len(pairs), **vars(rep))
    assert kills >= 3


# --- 2. crash between the state write and the offset commit -------------------------------

def test_crash_after_state_write_before_commit(cluster, tiny_model_dir):
    clf = model.load(tiny_model_dir)
    cfg = clf.model.config
    sessions, pairs = stream(20, seed=102)
    expected = expected_from(pairs)
    w = cluster.worker("w1", env=FAST, crash_after_write=3)
    feeder = cluster.feed(pairs, seconds=6)
    assert w.wait_exit(90) == -signal.SIGKILL, w.log_tail()
    assert "fault injection: SIGKILL after state write 3" in w.log_text()
    feeder.finish()
    keys = cluster.keys(clf.model_id)
    client = cluster.redis.client()
    snapshot = {sid: client.get(keys.session(sid)) for sid in expected}
    before = {(p["session_id"], p["seq"]) for p in cluster.predictions()}
    applied, unproduced = set(), set()
    for sid, raw in snapshot.items():
        if raw is None:
            continue
        st = decode_state(raw, cfg.num_layers, cfg.state_size, cfg.num_labels)
        seqs = sorted(s for s in expected[sid].seqs if s <= st.last_pos)
        applied |= {(sid, s) for s in seqs}
        # the written state is exactly the prefix it claims
        chunks = next(x.chunks for x in sessions if x.session_id == sid)
        h_want, _ = offline(clf, [t for c in chunks[:st.last_pos + 1] for t in c])
        assert float(abs(st.h - h_want).max()) <= 1e-5
    unproduced = applied - before
    assert unproduced, "the crash left no written-but-unproduced message"
    assert not (before - applied), "a prediction was produced for a message not applied"

    committed = sum(cluster.committed().values())
    w2 = cluster.worker("w2", env=FAST)
    want = {(sid, s) for sid, e in expected.items() for s in e.seqs}
    cluster.wait_predictions(want, 90)
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    # Everything applied but not committed was redelivered and recognised as applied: each is
    # a duplicate, nothing was applied twice, and every written-but-unproduced prediction came
    # from an outbox (commits are coalesced, so acknowledged ones may be re-emitted too).
    assert w2.outcome("duplicate") == len(applied) - committed
    assert w2.outcome("replayed") >= len(unproduced)
    assert w2.outcome("ok") == len(want) - len(applied)
    for sid in expected:  # sessions that had finished before the crash: bytes unchanged
        if expected[sid].last_seq in {s for (x, s) in applied if x == sid}:
            assert client.get(keys.session(sid)) == snapshot[sid], sid
    client.close()
    report("crash after write", messages=len(pairs), written_before_crash=len(applied),
           unproduced_at_crash=len(unproduced), replayed=int(w2.outcome("replayed")), **vars(rep))


# --- 2b. crash with two batches in flight --------------------------------------------------

def test_crash_with_two_batches_in_flight(cluster, tiny_model_dir):
    """Delivery is pipelined: batch N-1's acknowledgements are awaited while batch N is
    polled, decoded, loaded and stepped. SIGKILL exactly there (as batch N's load begins):
    N-1 is written and sent but not committed, N is polled. Nothing may be lost or applied
    twice: on redelivery N-1's messages are duplicates whose predictions come from the
    outboxes (no session was written again before N-1 was acknowledged)."""
    clf = model.load(tiny_model_dir)
    sessions, pairs = stream(20, seed=113)
    expected = expected_from(pairs)
    w = cluster.worker("w1", env={"GRU_BATCH__MAX_RECORDS": "24"}, crash_at_load=4)
    feeder = cluster.feed(pairs, seconds=6)
    assert w.wait_exit(90) == -signal.SIGKILL, w.log_tail()
    assert "fault injection: SIGKILL as load 4 begins" in w.log_text()
    feeder.finish()
    keys = cluster.keys(clf.model_id)
    client = cluster.redis.client()
    cfg = clf.model.config
    applied = set()
    for sid in expected:
        raw = client.get(keys.session(sid))
        if raw is not None:
            st = decode_state(raw, cfg.num_layers, cfg.state_size, cfg.num_labels)
            applied |= {(sid, s) for s in expected[sid].seqs if s <= st.last_pos}
    client.close()
    committed = sum(cluster.committed().values())
    assert len(applied) > committed, "the batch in flight was committed before the crash"
    w2 = cluster.worker("w2", env=FAST)
    want = {(sid, s) for sid, e in expected.items() for s in e.seqs}
    cluster.wait_predictions(want, 90)
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    assert w2.outcome("ok") == len(want) - len(applied)  # nothing applied twice
    assert w2.outcome("duplicate") == len(applied) - committed
    report("crash with two batches in flight", messages=len(pairs), applied_before_crash=len(applied),
           committed_before_crash=committed, replayed=int(w2.outcome("replayed")), **vars(rep))


# --- 3. zombie ---------------------------------------------------------------------------

@pytest.mark.slow
def test_paused_zombie_is_fenced_and_writes_nothing_stale(cluster, tiny_model_dir):
    sessions, pairs = stream(30, seed=103, max_tokens=200)
    # The zombie fills batches for up to 1.5 s, so it is nearly always holding polled records
    # when it is stopped: on SIGCONT it goes on to write them with its old epoch.
    a = cluster.worker("a", env={**FAST, "GRU_BATCH__MAX_WAIT_MS": "1500"})
    b = cluster.worker("b", env=FAST)
    a.wait_ready()
    b.wait_ready()
    time.sleep(4)  # let the second join settle: both hold partitions
    feeder = cluster.feed(pairs, seconds=24)
    feeder.wait_progress(0.15)
    fenced, pauses = 0.0, 0
    while fenced == 0 and pauses < 2:
        if pauses:  # a second try needs a to hold partitions again
            try:
                wait_for(lambda: a.metrics().get("gru_assigned_partitions", 0) > 0, 30, 0.2,
                         "a assigned")
            except Exception:
                break
        # Catch a in the middle of a batch: hang Redis until a's next batch waits on its MGET,
        # stop a there, and let Redis go. On SIGCONT a finds its reply and goes on to write.
        cluster.redis.pause()
        time.sleep(3.0)
        a.signal(signal.SIGSTOP)  # past its 6 s session timeout: its partitions move to b
        cluster.redis.resume()
        pauses += 1
        time.sleep(12)  # session timeout (6 s) + tansu's rebalance (~3 s) + b's INCR of the epochs
        a.signal(signal.SIGCONT)
        time.sleep(2)
        fenced = a.metrics().get("gru_fenced_partitions_total", 0.0)
        fenced_msgs = a.outcome("fenced")  # read now: a may be stopped if the group wedges
    expected, healed = finish_or_heal(cluster, pairs, feeder, [a, b])
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    stale = sum(w.log_text().count("stale write") for w in cluster.workers)
    log_fenced = a.log_text().count("fenced on ")
    report("zombie", pauses=pauses, tansu_livelock_healed=healed, fenced_partitions=fenced, fenced_log_lines=log_fenced,
           a_fenced_messages=fenced_msgs, stale_writes=stale, messages=len(pairs),
           **vars(rep))
    assert healed or (a.alive and b.alive)
    assert stale == 0
    if healed and fenced == 0:
        # The group wedged (tansu) before a could come back with records in hand: the states
        # are still checked above, but the fence itself was not reached in this run.
        warnings.warn("zombie: tansu group livelock before the fence was reached")
    else:
        assert fenced >= 1 and log_fenced >= 1, a.log_tail()


# --- 4. rebalance storm ------------------------------------------------------------------

@pytest.mark.slow
def test_rebalance_storm(cluster, tiny_model_dir):
    rng = random.Random(4)
    sessions, pairs = stream(30, seed=104)
    live = [cluster.worker("w0", env=FAST)]
    live[0].wait_ready()
    feeder = cluster.feed(pairs, seconds=30)
    # Joins and leaves every few seconds, in a fixed random order. They are spaced past the
    # session timeout because tansu 0.6.0's coordinator livelocks a group whose members keep
    # re-joining a second or two apart (see docs/reliability.md).
    plan = ["join", "sigkill", "join", "join", "sigterm", "sigkill"]
    n, actions = 1, []
    for action in plan:
        time.sleep(rng.uniform(4.5, 6.0))
        if action == "join":
            live.append(cluster.worker(f"w{n}", env=FAST))
            n += 1
        else:
            victim = live.pop(rng.randrange(len(live)))
            if action == "sigterm":
                assert victim.terminate() == 0, victim.log_tail()
            else:
                victim.kill()
        actions.append(action)
    assert len(live) == 1
    expected, healed = finish_or_heal(cluster, pairs, feeder, cluster.workers)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    report("rebalance storm", actions="/".join(actions), workers_started=n,
           tansu_livelock_healed=healed,
           messages=len(pairs), **vars(rep))


# --- 5. Redis restart --------------------------------------------------------------------

@pytest.mark.slow
def test_redis_killed_and_restarted_mid_stream(cluster, tiny_model_dir):
    sessions, pairs = stream(30, seed=105)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=15)
    for frac in (0.3, 0.65):
        feeder.wait_progress(frac)
        cluster.redis.kill()  # SIGKILL; AOF with appendfsync always keeps every acked write
        time.sleep(2.5)
        cluster.redis.start()
    expected = finish(cluster, pairs, feeder)
    retries = w.metrics().get('gru_dependency_retries_total{dependency="redis"}', 0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    report("redis restart", redis_kills=2, redis_retries=retries, messages=len(pairs),
           restarts_of_worker=0, **vars(rep))
    assert w.alive and retries >= 1
    assert w.outcome("duplicate") == 0  # it committed nothing it did not do, and lost nothing


# --- 6. broker pause ---------------------------------------------------------------------

@pytest.mark.slow
def test_broker_paused_for_8s(cluster, tiny_model_dir):
    sessions, pairs = stream(30, seed=106)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=14)
    feeder.wait_progress(0.4)
    t0 = time.monotonic()
    with cluster.kafka.paused(seconds=8):
        pass
    paused = time.monotonic() - t0
    expected = finish(cluster, pairs, feeder, timeout=120)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    m = w.metrics()
    report("broker pause", paused_s=round(paused, 1),
           kafka_retries=m.get('gru_dependency_retries_total{dependency="kafka"}', 0),
           messages=len(pairs), **vars(rep))
    assert w.alive


# --- 7. hostile input --------------------------------------------------------------------

def hostile_values(rng: random.Random, vocab: int, n: int = 200) -> list[tuple[bytes | None, bytes]]:
    """A fixed, seeded list of bad (key, value) pairs, each a Rejection by construction."""
    nasty_text = ["\u0000", "\ud800", "\udfff", "\u202e", "\ufeff", "e\u0301", "\U0001f600",
                  "\uffff", "\x7f", "' OR 1=1", "${jndi:x}", "%s%n", "../../etc/passwd"]
    out: list[tuple[bytes | None, bytes]] = []
    kinds = ["bytes", "nested", "wrongtype", "nan", "unicode", "range", "empty", "fields",
             "keymismatch", "longid", "hugeint", "surrogate_id", "badkey"]
    while len(out) < n:
        k = kinds[len(out) % len(kinds)]
        sid = f"bad{len(out)}"
        if k == "bytes":
            v = rng.randbytes(rng.randint(0, 300))
        elif k == "nested":
            d = rng.randint(50, 100_000)
            v = (b"[" * d + b"]" * d) if rng.random() < 0.5 else (b'{"a":' * d + b"1" + b"}" * d)
        elif k == "wrongtype":
            v = json.dumps(rng.choice([
                {"session_id": sid, "tokens": "not a list"}, {"session_id": 5, "tokens": ["a"]},
                {"session_id": sid, "seq": "1", "tokens": ["a"]},
                {"session_id": sid, "seq": 1.5, "tokens": ["a"]},
                {"session_id": sid, "seq": -1, "tokens": ["a"]},
                {"session_id": sid, "end": "yes", "tokens": ["a"]},
                {"session_id": sid, "token_ids": [1, True]}, {"session_id": sid, "text": 7},
                [sid], "str", 3, None])).encode()
        elif k == "nan":
            v = rng.choice([b'{"session_id":"%s","seq":NaN,"tokens":["a"]}',
                            b'{"session_id":"%s","token_ids":[Infinity]}',
                            b'{"session_id":"%s","seq":-Infinity,"tokens":["a"]}']) % sid.encode()
        elif k == "unicode":
            v = json.dumps({"session_id": sid, "tokens": [rng.choice(nasty_text)],
                            "extra": rng.choice(nasty_text)}).encode()
        elif k == "range":
            v = json.dumps({"session_id": sid, "token_ids": [0, rng.choice(
                [vocab, vocab + 1, 2**31, 2**63, -1])]}).encode()
        elif k == "empty":
            v = rng.choice([b"", b"{}", b"null", json.dumps({"session_id": sid, "tokens": []}).encode(),
                            json.dumps({"session_id": "", "tokens": ["a"]}).encode()])
        elif k == "fields":
            v = json.dumps({"session_id": sid, "tokens": ["a"], "text": "b"}).encode()
        elif k == "keymismatch":
            v = json.dumps({"session_id": sid, "tokens": ["a"]}).encode()
            out.append((b"other-" + sid.encode(), v))
            continue
        elif k == "longid":
            v = json.dumps({"session_id": "x" * rng.randint(257, 5000), "tokens": ["a"]}).encode()
            out.append((None, v))
            continue
        elif k == "hugeint":
            v = b'{"session_id":"%s","seq":%s,"tokens":["a"]}' % (sid.encode(), b"9" * rng.randint(4301, 20000))
        elif k == "surrogate_id":
            v = b'{"session_id":"s\\ud800%d","tokens":["a"]}' % len(out)
            out.append((None, v))
            continue
        else:  # a key that is not UTF-8
            out.append((b"\xff\xfe" + rng.randbytes(4), json.dumps({"session_id": sid, "tokens": ["a"]}).encode()))
            continue
        out.append((sid.encode(), v))
    # large ones: 1 MB messages and 10k-token messages
    big = json.dumps({"session_id": "big1", "text": "word " * 200_001}).encode()  # > 1,000,000 B
    out += [(b"big1", big), (b"big2", rng.randbytes(999_000)), (b"big3", b"\x01" * 1_040_000),
            (b"big4", json.dumps({"session_id": "big4", "tokens": ["the"] * 10_000}).encode()),
            (b"big5", json.dumps({"session_id": "big5", "token_ids": [2] * 10_000}).encode())]
    return out


def test_hostile_input_is_dead_lettered_and_good_sessions_stay_exact(cluster, tiny_model_dir):
    from worker.config import LimitSettings
    from worker.messages import Record, Rejection, decode

    clf = model.load(tiny_model_dir)
    rng = random.Random(7)
    bad = hostile_values(rng, len(clf.vocab))
    for k, v in bad:  # every one of them is bad input by the contract
        assert isinstance(decode(Record("t", 0, 0, k, v), len(clf.vocab), clf.encode,
                                 LimitSettings()), Rejection), (k, v[:200])
    sessions, good = stream(20, seed=107)
    # seq gaps: session 0 numbers its messages 0, 3, 6, ...
    gap_sid = sessions[0].session_id
    regapped = []
    for k, v in good:
        body = json.loads(v)
        if body["session_id"] == gap_sid:
            body["seq"] *= 3
            v = json.dumps(body).encode()
        regapped.append((k, v))
    good = regapped
    dups = [good[i] for i in rng.sample(range(len(good)), 15)]
    mixed = list(good)
    for item in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), ("bad", item))
    # a duplicate goes after its original
    for d in dups:
        at = mixed.index(d)
        mixed.insert(rng.randint(at + 1, len(mixed)), ("dup", d))
    flags = [x[0] if x[0] in ("bad", "dup") else "good" for x in mixed]
    pairs = [x[1] if x[0] in ("bad", "dup") else x for x in mixed]
    w = cluster.worker("w1")
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=12, max_request_size=4 << 20)
    expected = finish(cluster, good, feeder)
    positions = feeder.positions()
    bad_at = {pos for pos, f in zip(positions, flags) if f == "bad"}
    wait_for_count = time.monotonic() + 30
    while time.monotonic() < wait_for_count and w.outcome("dead_lettered") < len(bad):
        time.sleep(0.5)
    dlq = cluster.dead_letters()
    assert {(d["partition"], d["offset"]) for d in dlq} == bad_at
    assert len(dlq) == len(bad) and all(d["reason"] for d in dlq)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    assert w.alive and "Traceback" not in w.log_text()
    assert w.outcome("dead_lettered") == len(bad)
    assert w.outcome("duplicate") == len(dups)
    assert w.outcome("ok") == len(good)
    truncated = sum(1 for d in dlq if d.get("value_truncated"))
    report("hostile input", bad=len(bad), duplicates=len(dups), good=len(good),
           dead_lettered=len(dlq), truncated_dead_letters=truncated, **vars(rep))


# --- 8. memory bound ---------------------------------------------------------------------

@pytest.mark.slow
def test_memory_stays_bounded_over_100k_short_sessions(cluster, tiny_model_dir):
    clf = model.load(tiny_model_dir)
    n, ttl = 100_000, 2
    rng = random.Random(8)
    ids = [[rng.randrange(2, len(clf.vocab)) for _ in range(rng.randint(1, 6))] for _ in range(50)]
    w = cluster.worker("w1", env={"GRU_STATE__TTL_SECONDS": str(ttl),
                                  "GRU_BATCH__MAX_RECORDS": "512"})
    w.wait_ready()
    t0 = time.monotonic()
    prod = cluster.producer(linger_ms=20, batch_size=256 << 10)
    for i in range(n):
        sid = f"m{i}"
        prod.send(cluster.names["in"], key=sid.encode(),
                  value=b'{"session_id":"%s","seq":0,"token_ids":%s}' % (
                      sid.encode(), json.dumps(ids[i % 50]).encode()))
    prod.flush(120)
    prod.close()
    produce_s = time.monotonic() - t0
    r = cluster.redis.client()
    samples = []  # (processed, rss_kb, dbsize, used_memory)
    rss_20k = None
    deadline = time.monotonic() + 240
    while True:
        done = w.outcome("ok")
        samples.append((done, w.rss_kb(), r.dbsize(), r.info("memory")["used_memory"],
                        time.monotonic()))
        if rss_20k is None and done >= 20_000:
            rss_20k = samples[-1][1]
        if done >= n:
            break
        assert time.monotonic() < deadline, f"processed only {done} of {n}"
        time.sleep(0.5)
    process_s = time.monotonic() - t0
    rss_100k = w.rss_kb()
    time.sleep(4)  # every key's TTL has passed
    db_end, mem_end = r.dbsize(), r.info("memory")["used_memory"]
    r.close()
    keys = {rec.key for rec in cluster.read(cluster.names["out"])}
    assert len(keys) == n  # every session got its prediction
    max_db = max(s[2] for s in samples)
    max_mem = max(s[3] for s in samples)
    report("memory bound", sessions=n, produce_s=round(produce_s, 1), total_s=round(process_s, 1),
           rss_20k_mb=round(rss_20k / 1024, 1), rss_100k_mb=round(rss_100k / 1024, 1),
           max_dbsize=max_db, max_used_memory_mb=round(max_mem / 2**20, 1), dbsize_end=db_end,
           used_memory_end_mb=round(mem_end / 2**20, 1))
    assert rss_100k <= rss_20k * 1.3
    # Keys expire as fast as they come: alive at once are at most the keys of the last TTL plus
    # Redis' expiry lag (its active expiry sweeps about ten times a second), whatever the
    # worker's speed: at each sample, at most the sessions applied in the window before it,
    # plus what was written and not yet counted (two batches in flight, and the keys written
    # between reading the counter and DBSIZE). (A fixed n / 2 failed once the worker got
    # faster: 53,733 keys alive at 15.6k sessions/s; n over the whole run's time, once the
    # worker outran the producer: 47,123 alive with librdkafka.) A run shorter than that window
    # could not show expiry at all.
    window = ttl + 2
    assert process_s > window, f"{n} sessions took {process_s:.1f} s: too fast to show expiry"
    at, done_by = [s[4] for s in samples], [s[0] for s in samples]
    for done, _, alive, _, t in samples:
        recent = done - float(np.interp(t - window, at, done_by, left=0.0))
        assert alive <= recent + 2 * 512 + 1000 + cluster.partitions, (alive, recent, t - at[0])
    assert db_end <= cluster.partitions  # only the epoch keys are left


# --- 9. graceful shutdown under load -----------------------------------------------------

def test_sigterm_under_load_commits_what_was_done(cluster, tiny_model_dir):
    clf = model.load(tiny_model_dir)
    cfg = clf.model.config
    sessions, pairs = stream(30, seed=109)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=12)
    feeder.wait_progress(0.5)
    assert w.terminate() == 0, w.log_tail()
    assert "worker stopped:" in w.log_text()
    m = re.search(r"worker stopped: (\d+) messages .* ok=(\d+) .*duplicate=(\d+)", w.log_text())
    first_ok = int(m.group(2))
    # What was applied: the state positions in Redis. What was committed: the group offsets.
    keys = cluster.keys(clf.model_id)
    client = cluster.redis.client()
    last_pos = {}
    for s in sessions:
        raw = client.get(keys.session(s.session_id))
        if raw is not None:
            last_pos[s.session_id] = decode_state(raw, cfg.num_layers, cfg.state_size,
                                                  cfg.num_labels).last_pos
    committed = cluster.committed()
    produced_now = {(p["session_id"], p["seq"]) for p in cluster.predictions()}
    inputs = cluster.read(cluster.names["in"])
    applied = committed_n = 0
    for rec in inputs:
        body = json.loads(rec.value)
        was_applied = body["seq"] <= last_pos.get(body["session_id"], -1)
        is_committed = rec.offset < committed.get(rec.partition, 0)
        assert was_applied == is_committed, (rec.partition, rec.offset, was_applied, is_committed)
        if was_applied:
            applied += 1
            assert (body["session_id"], body["seq"]) in produced_now  # produced what was applied
        committed_n += is_committed
    assert applied == first_ok > 0
    w2 = cluster.worker("w2", env=FAST)
    expected = finish(cluster, pairs, feeder)
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    assert w2.outcome("duplicate") == 0  # nothing applied before the SIGTERM came back
    assert w2.outcome("ok") == len(pairs) - applied
    client.close()
    report("sigterm under load", messages=len(pairs), applied_before_sigterm=applied,
           committed_before_sigterm=committed_n, **vars(rep))


# --- 10. Redis rolled back under a running worker ----------------------------------------

def test_redis_restored_from_an_older_snapshot_after_commits(cluster, tiny_model_dir):
    clf = model.load(tiny_model_dir)
    sessions, pairs = stream(20, seed=110)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=15)
    feeder.wait_progress(0.33)
    time.sleep(0.5)
    snap = cluster.redis_snapshot()
    at_snapshot = cluster.recorded_offsets(clf.model_id)
    feeder.wait_progress(0.66)
    # Restore only once Kafka holds commits past what the snapshot holds: those commits say
    # "applied" for writes the restored Redis no longer has.
    wait_for(lambda: sum(cluster.committed().values()) > sum(at_snapshot.values()) + 20, 30, 0.2,
             "commits past the snapshot")
    committed_before = cluster.committed()
    cluster.redis_restore(snap)
    expected = finish(cluster, pairs, feeder)
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    m = w.metrics()
    rebuilds = m.get('gru_state_rebuilds_total{reason="rollback"}', 0)
    rebuilt = m.get('gru_messages_total{outcome="rebuilt"}', 0)
    report("redis rolled back", messages=len(pairs), snapshot_offsets=at_snapshot,
           committed_at_restore=committed_before, rebuilds=rebuilds, rebuilt_messages=rebuilt,
           worker_restarts=0, **vars(rep))
    assert w.alive and rebuilds >= 1 and rebuilt > 0


# --- 11. Redis restarted empty -----------------------------------------------------------

def test_redis_restarted_empty_mid_stream(cluster, tiny_model_dir):
    sessions, pairs = stream(30, seed=111)
    w = cluster.worker("w1", env=FAST)
    w.wait_ready()
    feeder = cluster.feed(pairs, seconds=15)
    feeder.wait_progress(0.5)
    wait_for(lambda: sum(cluster.committed().values()) > 50, 30, 0.2, "some commits")
    cluster.redis_wipe()
    expected = finish(cluster, pairs, feeder, timeout=120)
    time.sleep(1.0)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    m = w.metrics()
    loss = m.get('gru_state_rebuilds_total{reason="loss"}', 0)
    rebuilt = m.get('gru_messages_total{outcome="rebuilt"}', 0)
    report("redis wiped", messages=len(pairs), rebuilds=loss, rebuilt_messages=rebuilt,
           fenced_partitions=m.get("gru_fenced_partitions_total", 0), **vars(rep))
    assert w.alive and loss >= 1 and rebuilt > 0


# --- 12. a zombie holding a token from before a rollback ---------------------------------

def test_zombie_with_a_token_from_before_a_rollback_is_fenced(cluster, tiny_model_dir):
    """Hand-driven workers against the cluster's real tansu and redis-server. O claims and
    applies a batch; Redis is snapshotted; Z takes over, claims and polls a batch, then stalls
    (a zombie); Redis is restored from the snapshot, so its counter goes back; N takes over
    and claims: the counter hands out the number Z holds. Z's write must still be fenced."""
    from prometheus_client import CollectorRegistry
    from worker.app import build_worker
    from worker.config import Settings

    sessions, pairs = stream(12, seed=112)
    prod = cluster.producer()
    for k, v in pairs:
        prod.send(cluster.names["in"], key=k, value=v, partition=0)
    prod.flush(30)
    prod.close()

    def make(name: str, **batch):
        s = Settings(kafka={"bootstrap_servers": cluster.kafka.bootstrap,
                            "input_topic": cluster.names["in"], "output_topic": cluster.names["out"],
                            "dlq_topic": cluster.names["dlq"], "group_id": cluster.names["group"],
                            "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
                            "max_poll_interval_ms": 1000, "client_id": name,
                            "client": cluster.client},
                     redis={"url": cluster.redis.url, "prefix": cluster.names["prefix"]},
                     model={"dir": tiny_model_dir, "threads": 1},
                     metrics={"host": "127.0.0.1", "port": 0}, idle_exit_s=3.0,
                     batch={"max_records": 40, **batch})
        return build_worker(s, CollectorRegistry())

    def join(app, timeout=40):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = app.worker.source.poll(40, 0)
            if app.worker.ownership.owned:
                app.worker.process([])  # claim
                return records
        raise AssertionError("no assignment")

    def close(app):
        app.worker.source.close()
        app.worker.sink.close()
        app.close()

    o = make("o")
    first = join(o) or o.worker.source.poll(40, 200)
    o.worker.process(first)
    o.worker.settle()
    close(o)  # leaves the group after its commit
    snap = cluster.redis_snapshot()  # counter 1, O's token
    z = make("z")
    held = join(z)
    while not held:
        held = z.worker.source.poll(40, 200)
    z_token = z.worker.ownership.tokens[(cluster.names["in"], 0)]
    assert z_token.startswith("2:")
    cluster.redis_restore(snap)  # the counter is 1 again
    # past Z's max poll interval: it is out of the group, a zombie (librdkafka takes at least
    # the session timeout, 6 s, for it: it refuses a max.poll.interval.ms below that)
    time.sleep(7.5 if cluster.client == "confluent" else 2.5)
    n = make("n")
    n_first = join(n)
    n_token = n.worker.ownership.tokens[(cluster.names["in"], 0)]
    assert n_token.split(":")[0] == z_token.split(":")[0] == "2" and n_token != z_token
    z.worker.process(held)  # the zombie wakes up with its records and its token
    z.worker.settle()
    assert z.worker.summary.outcomes["fenced"] == len(held)
    assert z.registry.get_sample_value("gru_fenced_partitions_total") == 1
    close(z)
    n.worker.process(n_first)
    n.worker.settle()
    n.worker.run()
    n.close()
    expected = expected_from(pairs)
    rep = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    report("zombie from before a rollback", messages=len(pairs), zombie_records=len(held),
           zombie_token=z_token.split(":")[0], new_token=n_token.split(":")[0], **vars(rep))


def test_revoked_redis_credentials_end_a_worker_and_another_takes_over(cluster, tiny_model_dir):
    """Worker a's Redis user is disabled under load (a rotated password, a revoked ACL): a's
    next connection is refused for good. It must leave the group and exit with code 2 in
    bounded time, holding no partition, while worker b takes every partition and loses
    nothing."""
    client = cluster.redis.client()
    for user in ("alice", "bob"):
        client.acl_setuser(user, enabled=True, passwords=[f"+{user}-pw"], keys=["*"],
                           commands=["+@all"])
    sessions, pairs = stream(20, seed=95)
    creds = lambda u: {"GRU_REDIS__USERNAME": u, "GRU_REDIS__PASSWORD": f"{u}-pw",  # noqa: E731
                       **FAST}
    a = cluster.worker("a", env=creds("alice")).wait_ready(60)
    b = cluster.worker("b", env=creds("bob")).wait_ready(60)
    feeder = cluster.feed(pairs, seconds=12)
    feeder.wait_progress(0.3)
    client.acl_setuser("alice", enabled=False)
    client.client_kill_filter(user="alice")
    t0 = time.monotonic()
    wait_for(lambda: not a.alive, 60, 0.2, "worker a to exit")
    exited_s = time.monotonic() - t0
    assert a.proc.returncode == 2
    log_text = a.log_text()
    assert "redis at 127.0.0.1" in log_text and "alice-pw" not in log_text
    expected = finish(cluster, pairs, feeder, timeout=120)
    oracle = check_oracle(cluster, tiny_model_dir, expected, cluster.predictions())
    assert b.metrics()["gru_assigned_partitions"] == cluster.partitions
    client.close()
    report("revoked credentials", exited_s=round(exited_s, 1), sessions=oracle.sessions,
           max_diff=f"{oracle.max_diff:.1e}")


def test_after_a_rebalance_no_worker_exports_lag_for_a_partition_it_does_not_own(cluster):
    sessions, pairs = stream(16, seed=96)
    a = cluster.worker("a").wait_ready(60)
    feeder = cluster.feed(pairs, seconds=10)
    feeder.wait_progress(0.3)
    b = cluster.worker("b").wait_ready(60)

    def lag_partitions(w) -> set[str]:
        return {re.search(r'partition="(\d+)"', k).group(1) for k in w.metrics()
                if k.startswith("gru_consumer_lag_messages")}

    def settled() -> bool:
        la, lb = lag_partitions(a), lag_partitions(b)
        na, nb = a.metrics()["gru_assigned_partitions"], b.metrics()["gru_assigned_partitions"]
        return na + nb == cluster.partitions and na and nb and len(la) <= na and len(lb) <= nb
    wait_for(settled, 60, 0.5, "both workers holding partitions")
    for _ in range(10):  # over a few seconds of load, the series stay disjoint
        la, lb = lag_partitions(a), lag_partitions(b)
        assert not la & lb, (la, lb)
        assert len(la) <= a.metrics()["gru_assigned_partitions"]
        time.sleep(0.5)
    feeder.finish()
