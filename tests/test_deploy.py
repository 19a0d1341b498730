"""The deployment files: docker-compose.yml, deploy/Dockerfile, Prometheus config and alert
rules, the Grafana provisioning and dashboard.

There is no Docker engine here, so the compose file and the Dockerfile are checked as
structure and cross-file consistency. Everything Prometheus does is tested for real: promtool
checks the config and rules and runs the alert unit tests, and a real Prometheus scrapes a
real ``python -m worker run`` (against tansu) to evaluate every dashboard query and alert
expression. Needs ``promtool``/``prometheus`` on PATH (Debian: ``apt-get install
prometheus``; ``.ci/run`` installs it); without them those tests skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from worker.config import Settings
from devtools.launcher import TEST_GROUP_TIMEOUTS, WorkerProcess
from devtools.services import _Process, unique_names, wait_for
from worker.metrics import LATENCY_BUCKETS, Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "gru-worker.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus; .ci/run does)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not on PATH (apt-get install prometheus; .ci/run does)")

SERVICES = {"kafka", "redis", "redis-exporter", "init", "worker", "prometheus", "grafana"}
GRAFANA_VARS = re.compile(r"\$(?:__rate_interval|__interval|__range|\{__rate_interval\}"
                          r"|\{__interval\}|\{__range\})")
METRIC_NAME = re.compile(r"\bgru_[A-Za-z0-9_]+")


# --- helpers -------------------------------------------------------------------------------

def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


REQUIRED = "<required>"  # what a ${X:?message} stands for here: the operator must set X


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ``${X:-d}``/``${X-d}`` -> d,
    ``${X:?msg}`` (compose refuses to start without X) -> REQUIRED, ``${X}``/``$X`` -> '',
    ``$$`` -> ``$``."""
    value = re.sub(r"\$\{(\w+):?\?[^}]*\}", REQUIRED, value)
    value = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    value = re.sub(r"\$(?!\$)(\w+)", "", value)
    return value.replace("$$", "$")


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = "GRU_") -> set[str]:
    """Every env name Settings reads: GRU_<FIELD> and GRU_<SECTION>__<FIELD>, recursively."""
    names = set()
    for field, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= settings_env_names(ann, f"{prefix}{field.upper()}__")
        else:
            names.add(f"{prefix}{field.upper()}")
    return names


def exported_names(metrics_text: str) -> set[str]:
    """Series names a worker exposes: every sample name, plus the names its # TYPE lines
    promise (a labelled counter has no sample until first use)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query in the dashboard, rows' nested panels included."""
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    dash = json.loads(DASHBOARD.read_text())
    return [(p.get("title", ""), t["expr"]) for p in walk(dash["panels"])
            for t in p.get("targets", []) if t.get("expr")]


def all_rules() -> list[dict]:
    """Every rule of alerts.yml: alerts and recording rules."""
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def alert_rules() -> list[dict]:
    return [r for r in all_rules() if "alert" in r]


def promql(expr: str) -> str:
    """A dashboard expression with Grafana's interval variables filled in."""
    out = GRAFANA_VARS.sub("1m", expr)
    assert "$" not in out, f"unhandled Grafana variable in {expr!r}"
    return out


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    out = []
    for v in service.get("volumes", []):
        src, dst = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        out.append((src, dst))
    return out


# --- docker-compose.yml --------------------------------------------------------------------

@pytest.mark.unit
def test_compose_has_the_services_volumes_and_healthchecks():
    c = load_compose()
    s = c["services"]
    assert SERVICES <= set(s)
    for name in ("kafka", "redis", "worker"):
        hc = s[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} needs a healthcheck"

    kafka = s["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    kenv = env_of(kafka)
    assert set(kenv["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "PLAINTEXT://kafka:9092" in kenv["KAFKA_ADVERTISED_LISTENERS"]
    assert kenv["CLUSTER_ID"] and kenv["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "kafka-topics.sh" in " ".join(kafka["healthcheck"]["test"])
    assert "localhost:9092" in " ".join(kafka["healthcheck"]["test"])

    redis_ = s["redis"]
    assert redis_["image"] == "redis:7.4.1"
    cmd = redis_["command"]
    cmd = [interpolate(c) for c in (cmd.split() if isinstance(cmd, str) else cmd)]
    pairs = set(zip(cmd, cmd[1:]))
    # Durability that keeps rebuilds from the log rare (docs/reliability.md, "Durability").
    assert ("--appendonly", "yes") in pairs and ("--appendfsync", "always") in pairs
    # A ceiling, and writes that fail at it rather than keys evicted (docs/security.md).
    assert ("--maxmemory-policy", "noeviction") in pairs and ("--maxmemory", "1gb") in pairs
    # The input topic is the states' changelog: retained at least as long as the state TTL.
    from worker.config import Settings
    assert int(kenv["KAFKA_LOG_RETENTION_HOURS"]) * 3600 >= Settings().state.ttl_seconds
    assert redis_["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    assert env_of(redis_)["REDISCLI_AUTH"] == REQUIRED  # the probe authenticates

    # Every named volume a service mounts is declared; every bind mount exists in the repo.
    declared = set(c.get("volumes") or {})
    for name in ("redis-data", "models"):
        assert name in declared
    assert ("redis-data", "/data") in bind_mounts(redis_)
    for name, svc in s.items():
        for src, _ in bind_mounts(svc):
            if src.startswith((".", "/")):
                assert (ROOT / src).resolve().exists(), f"{name}: bind mount {src} missing"
            else:
                assert src in declared, f"{name}: volume {src} not declared"


@pytest.mark.unit
def test_worker_service_scales_and_init_prepares_topics_and_model():
    s = load_compose()["services"]
    w, init = s["worker"], s["init"]
    assert w["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / w["build"].get("context", ".") / w["build"]["dockerfile"]).is_file()
    # --scale worker=N needs no fixed name and no host port.
    assert "container_name" not in w and "ports" not in w
    assert w["depends_on"] == {"kafka": {"condition": "service_healthy"},
                               "redis": {"condition": "service_healthy"},
                               "init": {"condition": "service_completed_successfully"}}
    env = env_of(w)
    assert env["GRU_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["GRU_REDIS__URL"] == "redis://redis:6379/0"
    assert env["GRU_MODEL__DIR"] == "/models/bbc-gru"
    port = env["GRU_METRICS__PORT"]
    probe = " ".join(w["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in probe and "urllib" in probe
    assert ("models", "/models") in bind_mounts(w)

    # init: the same Dockerfile's train target (the worker's plus the training-only
    # packages), runs once after Kafka is healthy, creates topics, trains if missing.
    assert w["build"]["target"] == "worker" and init["build"]["target"] == "train"
    assert {**init["build"], "target": "worker"} == w["build"]
    assert init["image"] != w["image"]
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert str(init["restart"]) == "no"
    script = " ".join(init.get("entrypoint", []) + (init["command"] if isinstance(
        init["command"], list) else [init["command"]]))
    assert "python -m worker topics create --partitions ${PARTITIONS:-6}" in script
    assert "python -m model train --dataset bbc-news --out /models/bbc-gru" in script
    assert "/models/bbc-gru/config.json" in script
    assert ("models", "/models") in bind_mounts(init)
    assert env_of(init)["GRU_MODEL__DIR"] == "/models/bbc-gru"


@pytest.mark.unit
def test_every_gru_env_name_in_compose_is_a_setting(monkeypatch):
    known = settings_env_names()
    assert {"GRU_KAFKA__BOOTSTRAP_SERVERS", "GRU_REDIS__URL", "GRU_LOG_LEVEL"} <= known
    text = COMPOSE.read_text()
    used = set(re.findall(r"\bGRU_[A-Z][A-Z0-9_]*", text))
    assert used, "compose sets no GRU_* variable"
    assert used <= known, f"not Settings fields: {sorted(used - known)}"

    # And the values validate: the worker's environment, defaults filled in, builds Settings.
    for name in ("init", "worker"):
        for k in list(os.environ):
            if k.startswith("GRU_"):
                monkeypatch.delenv(k)
        env = env_of(load_compose()["services"][name])
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s = Settings()
        assert s.kafka.bootstrap_servers == "kafka:9092" and s.redis.url == "redis://redis:6379/0"
        if name == "worker":
            assert s.redis.password.get_secret_value() == REQUIRED
        assert str(s.model.dir) == "/models/bbc-gru" and s.kafka.partitions == 6
        if name == "worker":
            assert s.metrics.port == 9108 and s.metrics.host == "0.0.0.0"


@pytest.mark.unit
def test_prometheus_and_grafana_services_are_wired_to_the_deploy_files():
    s = load_compose()["services"]
    prom, graf = s["prometheus"], s["grafana"]
    assert prom["image"].startswith("prom/prometheus")
    mounts = dict(bind_mounts(prom))
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # rule_files is relative to the config file: alerts.yml must sit next to it.
    assert mounts["./deploy/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]

    genv = env_of(graf)
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    gm = dict(bind_mounts(graf))
    assert gm["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/dashboards.yml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == [
        gm["./deploy/grafana/dashboards"]]
    home = genv.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{gm['./deploy/grafana/dashboards']}/{DASHBOARD.name}"

    ds = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}, "every panel must query the provisioned datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]


@pytest.mark.unit
def test_prometheus_scrapes_every_worker_replica_on_the_metrics_port():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert "alerts.yml" in cfg["rule_files"]
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "worker"]
    [sd] = job["dns_sd_configs"]
    port = int(env_of(load_compose()["services"]["worker"])["GRU_METRICS__PORT"])
    assert sd == {**sd, "names": ["worker"], "type": "A", "port": port}
    # The alert rules select that job.
    assert any('job="worker"' in r["expr"] for r in alert_rules())
    # Redis memory comes from the exporter service, on the port it exposes.
    [redis_job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "redis"]
    exporter = load_compose()["services"]["redis-exporter"]
    assert redis_job["static_configs"] == [{"targets": [f"redis-exporter:{exporter['expose'][0]}"]}]
    assert any("redis_memory_max_bytes" in r["expr"] for r in alert_rules())


# --- deploy/Dockerfile and .dockerignore --------------------------------------------------

@pytest.mark.unit
def test_dockerfile_is_slim_cpu_by_default_non_root_and_runs_the_worker():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    args = dict(l.split(None, 1)[1].split("=", 1) for l in lines if l.startswith("ARG ") and "=" in l)
    assert args["BASE"] == "python:3.11.11-slim-bookworm"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    make_torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert args["TORCH_SPEC"] == make_torch.group(1) == "torch==2.13.0"
    assert any(l.startswith("FROM ${BASE}") for l in lines)
    assert any("--index-url" in l and "${TORCH_INDEX_URL}" in l and "${TORCH_SPEC}" in l
               for l in lines)
    users = [l.split()[1] for l in lines if l.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert lines[-2:] == ['ENTRYPOINT ["python", "-m", "worker"]', 'CMD ["run"]']
    assert "cu12" in text and "--build-arg" in text  # the CUDA variant is documented

    ignored = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    assert {".venv", "artifacts", ".git"} <= ignored
    for l in lines:
        if l.startswith("COPY ") and "--from" not in l:
            for src in l.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src
                    assert src.rstrip("/") not in ignored, f"{src} is in .dockerignore"
    assert (DEPLOY / "README.md").is_file()


# --- private by default (issue 26, F9) ----------------------------------------------------

@pytest.mark.unit
def test_the_compose_stack_is_private_by_default():
    c = load_compose()
    s = c["services"]
    # Host ports only on the loopback interface; none where only containers talk.
    published = {name: [interpolate(str(p)) for p in svc.get("ports", [])] for name, svc in s.items()}
    assert {n for n, ports in published.items() if ports} == {"kafka", "prometheus", "grafana"}
    for name, ports in published.items():
        for p in ports:
            assert p.startswith("127.0.0.1:"), f"{name} publishes {p} on every interface"
    assert "HOST://127.0.0.1:" in env_of(s["kafka"])["KAFKA_ADVERTISED_LISTENERS"]

    # Passwords come from the environment, with no default: ${X:?...} makes compose refuse
    # to start without X.
    text = COMPOSE.read_text()
    secrets = re.findall(r"\$\{(\w*PASSWORD\w*)([^}]*)\}", text)
    assert {name for name, _ in secrets} == {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    for name, modifier in secrets:
        assert modifier.startswith(":?"), f"${{{name}{modifier}}} has a default or may be empty"
    cmd = [interpolate(c) for c in s["redis"]["command"]]
    assert cmd[cmd.index("--requirepass") + 1] == REQUIRED
    assert env_of(s["worker"])["GRU_REDIS__PASSWORD"] == REQUIRED
    assert env_of(s["redis-exporter"])["REDIS_PASSWORD"] == REQUIRED
    assert "GRU_REDIS__PASSWORD" not in env_of(s["init"])  # init never talks to Redis
    genv = env_of(s["grafana"])
    assert genv["GF_SECURITY_ADMIN_PASSWORD"] == REQUIRED
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "GF_AUTH_ANONYMOUS_ORG_ROLE" not in genv

    # Prometheus: no lifecycle API (an unauthenticated POST /-/quit stops it).
    assert not any("lifecycle" in str(a) for a in s["prometheus"]["command"])
    assert "--web.enable-lifecycle" not in text.replace("# No --web.enable-lifecycle", "")

    # Every image pinned to an exact version, in the file itself (no variable, no floating tag).
    exact = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+([-.][\w.-]+)?(@sha256:[0-9a-f]{64})?$")
    for name, svc in s.items():
        if "build" in svc:
            continue
        assert exact.match(svc["image"]), f"{name}: image {svc['image']!r} is not pinned"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", dockerfile, re.M).group(1)
    assert exact.match(base), base

    example = (DEPLOY / "env.example").read_text()
    assert re.search(r"^REDIS_PASSWORD=$", example, re.M)
    assert re.search(r"^GRAFANA_ADMIN_PASSWORD=$", example, re.M)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


LOCKS = {"worker": DEPLOY / "requirements.lock", "train": DEPLOY / "requirements-train.lock"}


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for every requirement of a pip-compile style lock file."""
    out, name = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            name = m.group(1).lower().replace("_", "-")
            out[name] = (m.group(2), [])
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[name][1].append(h)
    return out


@pytest.mark.unit
def test_the_image_installs_from_lock_files_with_hashes():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [Requirement(d) for d in project["dependencies"]]
    data = [Requirement(d) for d in project["optional-dependencies"]["data"]]
    core += [Requirement(d) for d in project["optional-dependencies"]["rdkafka"]]  # both clients
    worker, train = read_lock(LOCKS["worker"]), read_lock(LOCKS["train"])
    for lock, path in ((worker, LOCKS["worker"]), (train, LOCKS["train"])):
        assert path.read_text().startswith("# This file was autogenerated by uv")
        assert "deploy/lock.sh" in path.read_text().splitlines()[1]
        assert lock and all(hashes for _, hashes in lock.values()), "a requirement without hashes"
        # torch comes from the CPU index by exact version, and none of the CUDA wheels' deps.
        assert "torch" not in lock
        assert not [n for n in lock if n.startswith(("nvidia-", "triton"))]
    # Every dependency pinned at a version it allows; the training-only ones not in the image.
    for req in core:
        name = req.name.lower()
        if name == "torch":
            continue
        assert name in worker, f"{name} is not in {LOCKS['worker'].name}"
        assert req.specifier.contains(worker[name][0]), (name, worker[name][0])
    for req in data:
        assert req.name.lower() not in worker and req.name.lower() in train
    # The train lock adds to the worker's: the packages they share are the same versions.
    assert set(worker) < set(train)
    assert all(train[n][0] == v for n, (v, _) in worker.items())

    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    installs = [l for l in lines if "pip install" in l]
    locked = [l for l in installs if "--require-hashes" in l]
    assert [re.search(r"-r (\S+)", l).group(1) for l in locked] == [
        "/tmp/requirements.lock", "/tmp/requirements-train.lock"]
    assert all("--only-binary=:all:" in l and "--no-deps" in l for l in locked)
    [torch_step] = [l for l in installs if l not in locked]
    assert '--index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"' in torch_step
    assert not any(re.search(r"pip install [^&]*\s\"?\.(\[|\"|\s|$)", l) for l in installs)
    for src in ("deploy/requirements.lock", "deploy/requirements-train.lock"):
        assert any(l.startswith(f"COPY {src} ") for l in lines)
    stages = [l.split()[-1] for l in lines if l.startswith("FROM ")]
    assert stages == ["base", "train", "worker"]  # the default target is the worker
    train_stage = text[text.index("AS train"):text.index("AS worker")]
    assert "requirements-train.lock" in train_stage


# --- metric names --------------------------------------------------------------------------

@pytest.mark.unit
def test_dashboard_and_alerts_use_only_exported_metric_names():
    text = generate_latest(Metrics(CollectorRegistry()).registry).decode()
    exported = exported_names(text)
    referenced = {n for _, e in dashboard_targets() for n in METRIC_NAME.findall(e)}
    referenced |= {n for r in all_rules() for n in METRIC_NAME.findall(r["expr"])}
    assert {"gru_e2e_latency_seconds_bucket", "gru_consumer_lag_messages",
            "gru_messages_total", "gru_model_predictions_total",
            "gru_model_label_prior"} <= referenced
    assert referenced <= exported, f"not exported by worker/metrics.py: {referenced - exported}"


@pytest.mark.unit
def test_dashboard_has_the_required_panels():
    exprs = " ".join(e for _, e in dashboard_targets())
    for needle in ("rate(gru_messages_total", "rate(gru_tokens_total",
                   "histogram_quantile(0.5, sum by (le) (rate(gru_e2e_latency_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le) (rate(gru_e2e_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(gru_e2e_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(gru_step_seconds_bucket",
                   "gru_batch_size_messages_bucket", "sum by (topic, partition) (gru_consumer_lag_messages)",
                   'outcome="dead_lettered"', 'outcome!="ok"', "gru_active_sessions",
                   "sum by (model_id, label, final) (rate(gru_model_predictions_total",
                   "gru_prediction_confidence_bucket", "gru_tokens_to_final_label_bucket",
                   "gru_session_length_tokens_bucket", "gru:final_label_share:ratio1h",
                   "gru:label_prior", "gru:final_label_drift:tvd1h",
                   "gru_predictions_suppressed_total"):
        assert needle in exprs, needle


@pytest.mark.unit
def test_every_alert_has_a_runbook_line():
    """deploy/README.md's runbook: a row per alert (what it means, what to check first, how
    to fix it), and no row for an alert that does not exist."""
    text = (DEPLOY / "README.md").read_text()
    runbook = text[text.index("### Runbook"):]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(Gru\w+)` \|.*$", runbook, re.M)}
    assert set(rows) == {r["alert"] for r in alert_rules()}
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(len(c) > 10 for c in cells[1:]), name


@pytest.mark.unit
def test_counters_start_at_zero_for_every_known_label_value():
    """increase() misses the first increment of a series that appears at 1: every counter
    with a known label value is exported at 0 before anything happens."""
    m = Metrics(CollectorRegistry())
    m.add_model("m1", ["a", "b"], None, "cpu", "current")
    get = m.registry.get_sample_value
    for dependency in ("redis", "kafka"):
        assert get("gru_dependency_retries_total", {"dependency": dependency}) == 0.0
        assert get("gru_dependency_backoff_seconds_total", {"dependency": dependency}) == 0.0
    for result in ("records", "empty"):
        assert get("gru_polls_total", {"result": result}) == 0.0
    for label in ("a", "b"):
        for final in ("true", "false"):
            assert get("gru_model_predictions_total",
                       {"model_id": "m1", "label": label, "final": final}) == 0.0
    assert get("gru_poll_wait_seconds_total") == 0.0


# --- promtool ------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = PROM_DIR) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.mark.unit
@pytest.mark.heavy
@needs_promtool
def test_promtool_check_config_and_rules(tmp_path):
    # In a copy, as Prometheus sees them in the container: both files in one directory.
    for f in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROM_DIR / f, tmp_path / f)
    out = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert "1 rule files found" in out
    out = promtool("check", "rules", "alerts.yml")
    n = len(all_rules())
    assert f"{n} rules found" in out and len(alert_rules()) >= 4
    records = {r["record"] for r in all_rules() if "record" in r}
    assert {"gru:final_label_share:ratio1h", "gru:label_prior",
            "gru:final_label_drift:tvd1h"} <= records


@pytest.mark.unit
@pytest.mark.heavy
@needs_promtool
def test_promtool_alert_unit_tests_pass_and_cover_every_alert():
    promtool("test", "rules", "alerts_test.yml")
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert {"GruE2ELatencyP99High", "GruConsumerLagGrowing", "GruDeadLetterRateHigh",
            "GruWorkerDown", "GruLabelDrift", "GruDependencyDown", "GruPartitionStalled",
            "GruWorkerNotReady", "GruNoPredictions"} <= names
    tested = {case["expr"] for t in tests for case in t.get("promql_expr_test", [])}
    assert {"gru:final_label_share:ratio1h", "gru:final_label_drift:tvd1h"} <= tested
    assert fired == names and quiet == names, "each alert needs a firing and a quiet case"


# --- a real Prometheus scraping a real worker ---------------------------------------------

class Prometheus(_Process):
    """The Prometheus server binary on a free port, TSDB in its temp dir."""

    name = "prometheus"
    start_timeout = 20.0

    def __init__(self, config: dict, files: dict[str, Path] | None = None):
        super().__init__()
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        for name, src in (files or {}).items():
            shutil.copy(src, self.dir / name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        return [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
            return r.status == 200

    def api(self, path: str, **params) -> dict:
        qs = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{qs}", timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422 carry the error as JSON
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)


class PacedLoad:
    """A load generator: BBC sessions (each ended, so that session-end series move too),
    fresh ids every round, sent at ``rate`` messages/s from a thread until ``stop()``."""

    def __init__(self, bootstrap: str, topic: str, rate: float = 100.0, seed: int = 21) -> None:
        import threading

        from .streams import bbc_sessions, interleave
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.rounds = [interleave(bbc_sessions(6, seed=seed + r, max_tokens=60,
                                               prefix=f"r{r}-"), seed=seed, end=True)
                       for r in range(3)]
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-load", daemon=True)

    def start(self) -> "PacedLoad":
        self._thread.start()
        return self

    def _run(self) -> None:
        import time

        from kafka import KafkaProducer
        p = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        t0 = time.monotonic()
        r = 0
        try:
            while not self._stop.is_set():
                for key, value in self.rounds[r % len(self.rounds)]:
                    if self._stop.is_set():
                        break
                    # Each round's sessions get new ids: a session is never replayed.
                    body = json.loads(value)
                    body["session_id"] = f"{r}-{body['session_id']}"
                    p.send(self.topic, key=body["session_id"].encode(),
                           value=json.dumps(body).encode())
                    self.sent += 1
                    delay = t0 + self.sent / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                r += 1
        finally:
            p.flush()
            p.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def scraped(broker, tiny_model_dir):
    """A worker on tansu and its own redis-server, under a steady load (plus one undecodable
    message), scraped every second by a real Prometheus that also loads alerts.yml. Yields
    (prometheus, worker's /metrics text); the load goes on while the tests run."""
    from kafka import KafkaProducer

    from devtools.services import RedisServer

    names = unique_names()
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    with RedisServer() as redis_srv:
        worker = WorkerProcess(
            ["--bootstrap", broker.bootstrap, "--group", names["group"], "--input-topic",
             names["in"], "--output-topic", names["out"], "--redis-url", redis_srv.url,
             "--model-dir", str(tiny_model_dir), "--threads", "1", *TEST_GROUP_TIMEOUTS,
             "--batch-wait-ms", "5"],
            env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"]})
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "rule_files": ["alerts.yml"],
                  "scrape_configs": [{"job_name": "worker", "static_configs": [
                      {"targets": [f"127.0.0.1:{worker.port}"]}]}]}
        prom = Prometheus(config, {"alerts.yml": PROM_DIR / "alerts.yml"})
        load = PacedLoad(broker.bootstrap, names["in"])
        try:
            prom.start()
            worker.start().wait_ready()
            # A scrape before any traffic, so that rate() sees the counters move.
            wait_for(lambda: prom.query('gru_e2e_latency_seconds_count{job="worker"}')["data"]["result"],
                     15, 0.2, "a first scrape of the worker")
            p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
            p.send(names["in"], key=b"bad", value=b"not json")
            p.flush()
            p.close()
            load.start()
            wait_for(lambda: worker.outcome("ok") >= 200 and worker.outcome("dead_lettered") >= 1,
                     40, 0.2, "the worker to process the load")
            yield prom, worker.get("/metrics")[1]
        finally:
            load.stop()
            worker.__exit__()
            prom.close()


@pytest.mark.services
@pytest.mark.heavy
@needs_prometheus
def test_prometheus_scrapes_the_worker_and_computes_p99_latency(scraped):
    prom, _ = scraped
    expr = "histogram_quantile(0.99, sum by (le) (rate(gru_e2e_latency_seconds_bucket[30s])))"

    def p99():
        res = prom.query(expr)
        assert res["status"] == "success", res
        vals = [float(r["value"][1]) for r in res["data"]["result"]]
        return vals[0] if len(vals) == 1 and math.isfinite(vals[0]) else None

    value = wait_for(p99, 30, 0.5, "a finite p99 from Prometheus")
    assert 0 < value <= max(LATENCY_BUCKETS)
    buckets = prom.query('gru_e2e_latency_seconds_bucket{job="worker"}')["data"]["result"]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1  # one series per bucket, +Inf included
    assert prom.query('up{job="worker"}')["data"]["result"][0]["value"][1] == "1"


# Dashboard expressions that have series only during a model rollout (a previous model being
# drained, GRU_MODEL__PREVIOUS_DIR): everything else must return data under load.
ROLLOUT_ONLY = {
    "max by (model_id, state) (gru_model_stored_sessions)",
    "max by (model_id) (gru_model_drain_progress)",
}


@pytest.mark.services
@pytest.mark.heavy
@needs_prometheus
def test_every_dashboard_expression_returns_data_under_load(scraped):
    """Every expression of the dashboard, run through the HTTP API of a real Prometheus that
    scrapes a worker under load, is valid and returns at least one finite sample, except the
    rollout-only ones named above (and those return nothing, as they should)."""
    prom, _ = scraped
    targets = dashboard_targets()
    assert len(targets) >= 15
    assert ROLLOUT_ONLY <= {e for _, e in targets}, "a rollout-only expression left the dashboard"

    def without_data() -> dict[str, str]:
        empty = {}
        for title, expr in targets:
            res = prom.query(promql(expr))
            assert res["status"] == "success", f"{title}: {expr}\n{res}"
            values = [float(r["value"][1]) for r in res["data"]["result"]]
            if not any(math.isfinite(v) for v in values):
                empty[expr] = title
        return empty

    # Windowed expressions need a few scrapes of the load; wait until only the named are left.
    deadline = time.monotonic() + 45
    empty = without_data()
    while not set(empty) <= ROLLOUT_ONLY and time.monotonic() < deadline:
        time.sleep(1.0)
        empty = without_data()
    assert set(empty) == ROLLOUT_ONLY, {e: t for e, t in empty.items() if e not in ROLLOUT_ONLY}
    for title in ("Input messages/s by outcome", "Tokens/s and predictions/s",
                  "Model step latency per batch", "Batch size (messages per batch)",
                  "Consumer lag per partition", "Active sessions", "Loaded model per worker",
                  "p99 end-to-end latency", "Workers up", "Dependencies up (lowest over workers)"):
        assert title in {t for t, _ in targets}, title


@pytest.mark.services
@pytest.mark.heavy
@needs_prometheus
def test_alert_rules_load_and_evaluate_on_real_worker_metrics(scraped):
    prom, metrics_text = scraped

    def rules():
        groups = prom.api("rules")["data"]["groups"]
        rs = [r for g in groups for r in g["rules"]]
        return rs if rs and all(r.get("health") == "ok" for r in rs) else None

    rs = wait_for(rules, 15, 0.5, "every rule to evaluate with health ok")
    assert {r["name"] for r in rs} == {r.get("alert") or r["record"] for r in all_rules()}
    # Healthy worker, tiny load: nothing fires.
    assert [r["name"] for r in rs if r.get("state") == "firing"] == []
    for r in all_rules():
        assert prom.query(r["expr"])["status"] == "success", r.get("alert") or r["record"]

    # The names the dashboard and alerts use are all in the live worker's /metrics.
    exported = exported_names(metrics_text)
    referenced = {n for _, e in dashboard_targets() for n in METRIC_NAME.findall(e)}
    referenced |= {n for r in all_rules() for n in METRIC_NAME.findall(r["expr"])}
    assert referenced <= exported, referenced - exported


@pytest.mark.services
@pytest.mark.heavy
@pytest.mark.slow
@needs_prometheus
def test_a_redis_outage_under_load_pages_and_resolves(broker, tiny_model_dir):
    """Redis stopped for 60 s under load: GruDependencyDown goes pending in a real Prometheus,
    the lag gauge rises while the loop waits, and the alert resolves after Redis is back."""
    from devtools.services import RedisServer

    names = unique_names()
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    with RedisServer() as redis_srv:
        worker = WorkerProcess(
            ["--bootstrap", broker.bootstrap, "--group", names["group"], "--input-topic",
             names["in"], "--output-topic", names["out"], "--redis-url", redis_srv.url,
             "--model-dir", str(tiny_model_dir), "--threads", "1", *TEST_GROUP_TIMEOUTS],
            env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"], "GRU_RETRY__MAX_BACKOFF_S": "1"})
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"},
                  "rule_files": ["alerts.yml"],
                  "scrape_configs": [{"job_name": "worker", "static_configs": [
                      {"targets": [f"127.0.0.1:{worker.port}"]}]}]}
        prom = Prometheus(config, {"alerts.yml": PROM_DIR / "alerts.yml"})
        load = PacedLoad(broker.bootstrap, names["in"], rate=50)

        def alert_state() -> str | None:
            alerts = prom.api("alerts")["data"]["alerts"]
            return next((a["state"] for a in alerts
                         if a["labels"]["alertname"] == "GruDependencyDown"), None)

        def lag() -> float:
            m = worker.metrics()
            return sum(v for k, v in m.items() if k.startswith("gru_consumer_lag_messages"))
        try:
            prom.start()
            worker.start().wait_ready()
            load.start()
            wait_for(lambda: worker.outcome("ok") >= 100, 40, 0.2, "the worker under load")
            assert alert_state() is None
            redis_srv.kill()
            down_at = time.monotonic()
            wait_for(lambda: alert_state() in ("pending", "firing"), 30, 0.5,
                     "GruDependencyDown pending")
            lags = []
            while time.monotonic() - down_at < 60:
                lags.append(lag())
                time.sleep(5)
            assert worker.get("/readyz")[0] == 503
            redis_srv.start()
            wait_for(lambda: worker.get("/readyz")[0] == 200, 60, 0.5, "ready again")
            wait_for(lambda: alert_state() is None, 150, 1.0, "GruDependencyDown resolved")
        finally:
            load.stop()
            worker.__exit__()
            prom.close()
    assert lags[-1] > lags[0] + 100, lags  # 50 msg/s waiting for a minute
    assert "is back after" in worker.log_text()
