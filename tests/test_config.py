"""Tier 1: the settings model is the one declaration of every setting and flag; the README's
configuration table and the CLI are derived from it, and checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.__main__ import main
from worker.config import Settings, settings_info

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rows() -> list[tuple[set[str], set[str]]]:
    """(env names, flags) per row of the README's configuration table. A bare ``NAME`` after
    ``GRU_SECTION__X`` in the same cell is short for ``GRU_SECTION__NAME``."""
    text = README.read_text()
    table = text[text.index("## Configuration"):text.index("## Metrics")]
    rows = []
    for line in table.splitlines():
        if not line.startswith("| `GRU_"):
            continue
        setting, _default, flags = [c.strip() for c in line.strip("|").split("|")][:3]
        names, section = set(), None
        for tok in re.findall(r"`([A-Z0-9_]+)`", setting):
            if tok.startswith("GRU_"):
                names.add(tok)
                section = tok.rsplit("__", 1)[0] + "__" if "__" in tok else None
            elif section:
                names.add(section + tok)
        rows.append((names, set(re.findall(r"`(--[a-z0-9-]+)`", flags))))
    return rows


def test_readme_table_lists_every_setting_once_and_no_other():
    documented = [n for names, _ in readme_rows() for n in names]
    assert len(documented) == len(set(documented)), "a setting is listed twice"
    assert set(documented) == {i.env for i in settings_info()}


def test_readme_flags_are_the_declared_ones():
    flag_of = {i.env: i.flag for i in settings_info()}
    for names, flags in readme_rows():
        assert flags == {flag_of[n] for n in names if flag_of[n]}, names


def test_every_flag_reaches_its_setting(monkeypatch):
    """Each declared flag sets exactly its field: parse a run command line with a value for
    every flag and build the Settings the way ``cmd_run`` does."""
    import worker.__main__ as cli
    seen = {}
    monkeypatch.setattr(cli, "cmd_run", lambda args: seen.setdefault("s", cli.settings_from_args(args)) and 0)
    values = {"--bootstrap": "k:1", "--kafka-client": "confluent", "--input-topic": "a", "--output-topic": "b", "--group": "g1",
              "--session-timeout-ms": "7000", "--heartbeat-interval-ms": "1000",
              "--redis-url": "memory", "--redis-prefix": "p1", "--state-dtype": "float16",
              "--model-dir": "/m", "--device": "auto", "--threads": "3", "--dtype": "float16",
              "--batch-size": "64", "--batch-wait-ms": "5", "--target-latency-ms": "12.5",
                  "--metrics-host": "127.0.0.1",
              "--metrics-port": "0", "--log-level": "debug", "--max-messages": "9",
              "--idle-exit": "1.5", "--emit": "change", "--min-confidence": "0.6",
              "--previous-model-dir": "/old", "--log-format": "json"}
    assert set(values) == {i.flag for i in settings_info() if i.flag}
    parser_ran = main(["run", *[x for kv in values.items() for x in kv]])
    assert parser_ran == 0
    s: Settings = seen["s"]
    got = {i.flag: s.model_dump()[i.path[0]] if len(i.path) == 1 else
           s.model_dump()[i.path[0]][i.path[1]] for i in settings_info() if i.flag}
    assert got == {"--bootstrap": "k:1", "--kafka-client": "confluent", "--input-topic": "a",
                   "--output-topic": "b",
                   "--group": "g1", "--session-timeout-ms": 7000, "--heartbeat-interval-ms": 1000,
                   "--redis-url": "memory", "--redis-prefix": "p1", "--state-dtype": "float16",
                   "--model-dir": Path("/m"), "--device": "auto", "--threads": 3,
                   "--dtype": "float16", "--batch-size": 64, "--batch-wait-ms": 5,
                   "--target-latency-ms": 12.5,
                   "--metrics-host": "127.0.0.1", "--metrics-port": 0, "--log-level": "DEBUG",
                   "--max-messages": 9, "--idle-exit": 1.5, "--emit": "change",
                   "--min-confidence": 0.6, "--previous-model-dir": Path("/old"),
                   "--log-format": "json"}


def test_flags_override_env_which_overrides_defaults(monkeypatch):
    import argparse

    from worker.__main__ import add_setting_flags, settings_from_args
    monkeypatch.setenv("GRU_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("GRU_BATCH__MAX_RECORDS", "32")
    p = argparse.ArgumentParser()
    add_setting_flags(p)
    s = settings_from_args(p.parse_args(["--group", "from-flag"]))
    assert s.kafka.group_id == "from-flag" and s.batch.max_records == 32
    assert s.kafka.session_timeout_ms == 10_000


def test_require_key_off_is_refused_with_a_redis_cluster():
    with pytest.raises(ValueError, match="GRU_LIMITS__REQUIRE_KEY=false"):
        Settings(redis={"url": "redis+cluster://h:1"}, limits={"require_key": False})


def test_one_torch_thread_unless_asked(monkeypatch):
    """The worker's own threads (Kafka's network and sender threads, Redis) share the cores
    with torch's: the default is one torch thread, a set value is taken, zero is refused."""
    import pydantic
    import pytest

    assert Settings().model.threads == 1
    monkeypatch.setenv("GRU_MODEL__THREADS", "4")
    assert Settings().model.threads == 4
    monkeypatch.setenv("GRU_MODEL__THREADS", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()


# --- settings that cannot be right: one line each, naming the env var or flag ----------------

def _problems(monkeypatch, env: dict[str, str], argv: list[str] = ()) -> list[str]:
    import argparse

    from worker.__main__ import add_setting_flags, settings_from_args
    from worker.config import ConfigError
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    add_setting_flags(p)
    with pytest.raises(ConfigError) as e:
        settings_from_args(p.parse_args(list(argv)))
    return e.value.lines


@pytest.mark.parametrize("env, argv, line", [
    ({"GRU_BATCH__MAX_RECORDS": "abc"}, [],
     "GRU_BATCH__MAX_RECORDS (--batch-size): must be an integer, got 'abc'"),
    ({}, ["--batch-size", "abc"],
     "--batch-size (GRU_BATCH__MAX_RECORDS): must be an integer, got 'abc'"),
    ({"GRU_OUTPUT__EMIT": "sometimes"}, [],
     "GRU_OUTPUT__EMIT (--emit): must be one of 'every', 'change' or 'final', got 'sometimes'"),
    ({"GRU_STATE__END_TTL_SECONDS": "5"}, [], "GRU_STATE__END_TTL_SECONDS: must be at least 60, got '5'"),
    ({}, ["--metrics-port", "70000"],
     "--metrics-port (GRU_METRICS__PORT): must be at most 65535, got '70000'"),
    ({"GRU_BATCH__GC_FREEZE": "maybe"}, [], "GRU_BATCH__GC_FREEZE: must be true or false, got 'maybe'"),
    ({"GRU_REDIS__PREFIX": "a b"}, [], "GRU_REDIS__PREFIX (--redis-prefix): must match "
     "^[A-Za-z0-9_.\\-]{1,64}$, got 'a b'"),
    ({"GRU_KAFKA__HEARTBEAT_INTERVAL_MS": "5000"}, [],
     "GRU_KAFKA__HEARTBEAT_INTERVAL_MS (--heartbeat-interval-ms) 5000 must be at most a third "
     "of GRU_KAFKA__SESSION_TIMEOUT_MS (--session-timeout-ms) 10000"),
    ({}, ["--input-topic", "x", "--output-topic", "x"],
     "GRU_KAFKA__INPUT_TOPIC (--input-topic) 'x', GRU_KAFKA__OUTPUT_TOPIC (--output-topic) 'x', "
     "GRU_KAFKA__DLQ_TOPIC 'tokens.dlq' and GRU_KAFKA__CHECKPOINT_TOPIC 'x.checkpoints' must be "
     "four different topics"),
])
def test_a_bad_setting_is_one_line_naming_it(monkeypatch, env, argv, line):
    assert _problems(monkeypatch, env, argv) == [line]


def test_every_bad_setting_gets_its_own_line_and_no_secret_is_echoed(monkeypatch):
    lines = _problems(monkeypatch, {"GRU_BATCH__MAX_RECORDS": "0", "GRU_OUTPUT__EMIT": "x",
                                    "GRU_KAFKA__SASL_PLAIN_PASSWORD": "s3cret"},
                      ["--threads", "-1"])
    assert len(lines) == 3 and all("s3cret" not in l for l in lines)
    assert lines[0].startswith("GRU_MODEL__THREADS") is False  # came from the flag
    assert any(l.startswith("--threads (GRU_MODEL__THREADS): must be at least 1") for l in lines)


def test_a_mistyped_env_var_is_named_with_the_closest_setting():
    from worker.config import unknown_env
    assert unknown_env({"GRU_BATCH__MAX_RECORD": "3", "GRU_KAFKA__BOOTSTRAP_SERVERS": "k:1",
                        "GRU_KAFKA": "{}", "PATH": "/bin"}) == [
        "GRU_BATCH__MAX_RECORD is not a setting and is ignored (did you mean "
        "GRU_BATCH__MAX_RECORDS?)"]


def test_run_help_describes_every_flag_and_shows_its_default():
    """Every option of ``run`` (and the common options of produce/tail/topics) has a
    description and names its default."""
    from worker.__main__ import build_parser
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = action.option_strings[-1]
            assert action.help and len(action.help) > 12, f"{name} {flag}: no description"
            if name == "run" or action.dest in {i.dest for i in settings_info()}:
                assert "default" in action.help, f"{name} {flag}: no default shown"
    run_help = sub.choices["run"].format_help()
    for needle in ("[default: 9108; env GRU_METRICS__PORT]", "[default: 1]",
                   "[default: tokens; env GRU_KAFKA__INPUT_TOPIC]", "where the model runs"):
        assert needle in " ".join(run_help.split()), needle
