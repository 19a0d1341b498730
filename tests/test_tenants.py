"""Issue 26, F2: a session belongs to the tenant whose records write it (worker/tenants.py).

Tier 1: the rule on single records, the key layout, the settings. Tier 2: the loop with
in-memory fakes, two tenants writing one session id on one shared topic."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from worker.config import LimitSettings, Settings
from worker.messages import Rejection, TokenMessage, decode
from worker.ports import Record
from worker.state import Keys, MemoryStateStore
from worker.tenants import sign, tenant_key

from .fakes import FakeLog
from .streams import bbc_sessions
from .workers import DLQ, IN, OUT, make_worker

H = "gru-tenant"
SECRET = "a-secret-of-the-worker-only"


def rec(sid="chat", headers=(), **body) -> Record:
    value = json.dumps({"session_id": sid, "tokens": ["a"], **body}).encode()
    return Record(IN, 0, 7, sid.encode(), value, 1, tuple(headers))


def dec(r: Record, **limits):
    return decode(r, 10, lambda toks: [2] * len(toks), LimitSettings(tenant_header=H, **limits))


@pytest.mark.unit
def test_a_session_is_its_tenant_and_its_id():
    m = dec(rec(headers=[(H, b"acme"), ("other", b"x")]))
    assert isinstance(m, TokenMessage) and m.session_id == "acme/chat"
    assert decode(rec(headers=[(H, b"acme")]), 10, lambda t: [2], LimitSettings()).session_id \
        == "chat"  # no tenant header configured: headers are ignored


@pytest.mark.unit
@pytest.mark.parametrize("headers,reason", [
    ((), "header 'gru-tenant' is missing"),
    (((H, b"acme"), (H, b"beta")), "header 'gru-tenant' is given 2 times"),
    (((H, b"ac/me"),), "not a tenant name"),
    (((H, b""),), "not a tenant name"),
    (((H, "Ü".encode()),), "not a tenant name"),
])
def test_a_record_without_one_valid_tenant_is_dead_lettered(headers, reason):
    r = dec(rec(headers=headers))
    assert isinstance(r, Rejection) and reason in r.reason


@pytest.mark.unit
def test_with_a_secret_a_tenant_must_be_proven_by_its_signature():
    acme = tenant_key(SECRET.encode(), "acme")
    ok = dec(rec(headers=[(H, b"acme"), (H + "-signature", sign(acme, "chat"))]),
             tenant_secret=SECRET)
    assert isinstance(ok, TokenMessage) and ok.session_id == "acme/chat"
    beta = tenant_key(SECRET.encode(), "beta")
    for headers in ([(H, b"acme"), (H + "-signature", sign(beta, "chat"))],  # beta's key
                    [(H, b"acme"), (H + "-signature", sign(acme, "other"))],  # another session
                    [(H, b"acme")]):
        r = dec(rec(headers=headers), tenant_secret=SECRET)
        assert isinstance(r, Rejection) and "signature" in r.reason, headers
        assert SECRET not in r.reason and acme.hex() not in r.reason


@pytest.mark.unit
def test_tenant_settings_are_checked():
    with pytest.raises(ValidationError, match="tenant_secret needs limits.tenant_header"):
        LimitSettings(tenant_secret=SECRET)
    with pytest.raises(ValidationError, match="at least 16 characters"):
        LimitSettings(tenant_header=H, tenant_secret="short")
    with pytest.raises(ValidationError):
        LimitSettings(tenant_header="a header")
    assert SECRET not in repr(Settings(limits={"tenant_header": H, "tenant_secret": SECRET}))


@pytest.mark.unit
def test_the_tenant_goes_into_the_state_key_inside_the_cluster_hash_tag_rule():
    keys = Keys("gru", "m1", "grp", cluster=True)
    assert keys.session("acme/chat", ("tokens", 3)) == "gru:{tokens|3}:m1:grp:s:acme/chat"
    assert keys.session("beta/chat", ("tokens", 3)) != keys.session("acme/chat", ("tokens", 3))
    assert keys.model_of(keys.session("acme/chat", ("tokens", 3))) == "m1"


@pytest.mark.fakes
def test_one_tenants_records_cannot_touch_anothers_session_of_the_same_id(clf):
    """acme and beta share the input topic and both use session id "chat". beta's producer
    sends acme's next seq with its own tokens, seq 2^53 - 1, and end=true: with the tenant
    header each lands in beta's own session, and acme's predictions are the offline model's
    over acme's tokens alone. (Without tenants, issue 26 measured all three changing acme's
    session.) Predictions are keyed <tenant>/<session_id> and name their tenant; a record
    without the header is dead-lettered."""
    log, store = FakeLog(partitions=1), MemoryStateStore()
    acme = bbc_sessions(1, seed=5)[0]
    beta = bbc_sessions(1, seed=6)[0]
    n = len(acme.chunks)
    assert n > 3

    def send(tenant, seq, tokens, end=False, headers=None):
        body = {"session_id": "chat", "seq": seq, "tokens": tokens, **({"end": True} if end else {})}
        log.append(IN, b"chat", json.dumps(body).encode(),
                   headers=[(H, tenant.encode())] if headers is None else headers)

    for i, chunk in enumerate(acme.chunks[:2]):
        send("acme", i, chunk)
    send("beta", 2, beta.tokens[:20])  # acme's next seq
    send("beta", 2**53 - 1, beta.tokens[20:30])  # a freeze, were it acme's
    send("beta", 2**53, [], end=True)  # past the contract's seq range: dead-lettered
    send("beta", 3, [], end=True)  # ends beta's chat, not acme's
    send("acme", 99, ["x"], headers=[])  # no tenant: dead-lettered
    for i, chunk in enumerate(acme.chunks[2:], start=2):
        send("acme", i, chunk)
    w = make_worker(clf, log, store, limits={"tenant_header": H})
    w.run()

    outs = [(r.key, json.loads(r.value)) for r in log.records[(OUT, 0)]]
    acme_preds = [p for k, p in outs if k == b"acme/chat"]
    beta_preds = [p for k, p in outs if k == b"beta/chat"]
    assert [p["seq"] for p in acme_preds] == list(range(n))
    assert all(p["tenant"] == "acme" and p["session_id"] == "chat" for p in acme_preds)
    want = clf.classify(acme.tokens)
    last = acme_preds[-1]
    assert last["tokens_seen"] == len(acme.tokens) and not last["final"]
    assert max(abs(last["probs"][label] - want[label]) for label in want) <= 1e-5
    # beta's seq 2 began its session at a seq past 0; its jump to 2^53 - 1 was past the gap
    assert [(p["seq"], p["final"], p["context"]) for p in beta_preds] == [
        (2, False, "partial"), (3, True, "partial")]
    dead = [json.loads(v)["reason"] for v in log.values(DLQ)]
    assert len(dead) == 3
    assert any("max_seq_gap" in r for r in dead) and any("seq must be" in r for r in dead)
    assert any("header 'gru-tenant' is missing" in r for r in dead)
    assert store.load(["acme/chat", "beta/chat", "chat"])[2] is None
