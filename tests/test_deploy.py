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
from devtools.services import Tansu, _Process, unique_names, wait_for
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

SERVICES = {"kafka", "redis", "init", "worker", "prometheus", "grafana"}
GRAFANA_VARS = re.compile(r"\$(?:__rate_interval|__interval|__range|\{__rate_interval\}"
                          r"|\{__interval\}|\{__range\})")
METRIC_NAME = re.compile(r"\bgru_[A-Za-z0-9_]+")


# --- helpers -------------------------------------------------------------------------------

def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose interpolation with every variable unset: ``${X:-d}``/``${X-d}`` -> d,
    ``${X}``/``$X`` -> '', ``$$`` -> ``$``."""
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
    assert redis_["image"] == "redis:7"
    cmd = redis_["command"]
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    pairs = set(zip(cmd, cmd[1:]))
    # Durability that keeps rebuilds from the log rare (docs/reliability.md, "Durability").
    assert ("--appendonly", "yes") in pairs and ("--appendfsync", "always") in pairs
    assert ("--maxmemory-policy", "noeviction") in pairs
    # The input topic is the states' changelog: retained at least as long as the state TTL.
    from worker.config import Settings
    assert int(kenv["KAFKA_LOG_RETENTION_HOURS"]) * 3600 >= Settings().state.ttl_seconds
    assert redis_["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]

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

    # init: same image, runs once after Kafka is healthy, creates topics, trains if missing.
    assert init["build"] == w["build"] and init.get("image") == w.get("image")
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert str(init["restart"]) == "no"
    script = " ".join(init.get("entrypoint", []) + (init["command"] if isinstance(
        init["command"], list) else [init["command"]]))
    assert "python -m worker topics create --partitions ${PARTITIONS:-6}" in script
    assert "python -m model train --dataset bbc-news --out /models/bbc-gru" in script
    assert "/models/bbc-gru/config.json" in script
    assert ("models", "/models") in bind_mounts(init)
    assert env_of(init)["GRU_MODEL__DIR"] == "/models/bbc-gru"


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
        assert str(s.model.dir) == "/models/bbc-gru" and s.kafka.partitions == 6
        if name == "worker":
            assert s.metrics.port == 9108 and s.metrics.host == "0.0.0.0"


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
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert genv["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
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


def test_prometheus_scrapes_every_worker_replica_on_the_metrics_port():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert "alerts.yml" in cfg["rule_files"]
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "worker"]
    [sd] = job["dns_sd_configs"]
    port = int(env_of(load_compose()["services"]["worker"])["GRU_METRICS__PORT"])
    assert sd == {**sd, "names": ["worker"], "type": "A", "port": port}
    # The alert rules select that job.
    assert any('job="worker"' in r["expr"] for r in alert_rules())


# --- deploy/Dockerfile and .dockerignore --------------------------------------------------

def test_dockerfile_is_slim_cpu_by_default_non_root_and_runs_the_worker():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()
             if l.strip() and not l.strip().startswith("#")]
    args = dict(l.split(None, 1)[1].split("=", 1) for l in lines if l.startswith("ARG ") and "=" in l)
    assert args["BASE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    make_torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert args["TORCH_SPEC"] == make_torch.group(1) == "torch==2.13.0"
    assert any(l.startswith("FROM ${BASE}") for l in lines)
    assert any("--index-url" in l and "${TORCH_INDEX_URL}" in l and "${TORCH_SPEC}" in l
               for l in lines)
    assert any(re.search(r"pip install \"?\.\[data,rdkafka\]\"?", l) for l in lines)  # both clients
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


# --- metric names --------------------------------------------------------------------------

def test_dashboard_and_alerts_use_only_exported_metric_names():
    text = generate_latest(Metrics(CollectorRegistry()).registry).decode()
    exported = exported_names(text)
    referenced = {n for _, e in dashboard_targets() for n in METRIC_NAME.findall(e)}
    referenced |= {n for r in all_rules() for n in METRIC_NAME.findall(r["expr"])}
    assert {"gru_e2e_latency_seconds_bucket", "gru_consumer_lag_messages",
            "gru_messages_total", "gru_model_predictions_total",
            "gru_model_label_prior"} <= referenced
    assert referenced <= exported, f"not exported by worker/metrics.py: {referenced - exported}"


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


# --- promtool ------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = PROM_DIR) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


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
            "GruWorkerDown", "GruLabelDrift"} <= names
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


@pytest.fixture(scope="module")
def broker():
    with Tansu() as t:
        yield t


@pytest.fixture(scope="module")
def scraped(broker, tiny_model_dir):
    """A worker that processed some sessions, scraped every second by a real Prometheus that
    also loads alerts.yml. Yields (prometheus, worker's /metrics text)."""
    from kafka import KafkaProducer

    from .streams import bbc_sessions, interleave

    names = unique_names()
    broker.create_topics([names["in"], names["out"], names["dlq"]], partitions=2)
    worker = WorkerProcess(
        ["--bootstrap", broker.bootstrap, "--group", names["group"], "--input-topic", names["in"],
         "--output-topic", names["out"], "--redis-url", "memory", "--model-dir", str(tiny_model_dir),
         "--threads", "1", *TEST_GROUP_TIMEOUTS, "--batch-wait-ms", "5"],
        env={"GRU_KAFKA__DLQ_TOPIC": names["dlq"]})
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                         "evaluation_interval": "1s"},
              "rule_files": ["alerts.yml"],
              "scrape_configs": [{"job_name": "worker", "static_configs": [
                  {"targets": [f"127.0.0.1:{worker.port}"]}]}]}
    prom = Prometheus(config, {"alerts.yml": PROM_DIR / "alerts.yml"})
    try:
        prom.start()
        worker.start().wait_ready()
        # A scrape before any traffic, so that rate() sees the counters move.
        wait_for(lambda: prom.query('gru_e2e_latency_seconds_count{job="worker"}')["data"]["result"],
                 15, 0.2, "a first scrape of the worker")
        pairs = interleave(bbc_sessions(8, seed=21, max_tokens=80), seed=21)
        p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
        for key, value in pairs + [(b"bad", b"not json")]:
            p.send(names["in"], key=key, value=value)
        p.flush()
        p.close()
        wait_for(lambda: f'gru_messages_total{{outcome="ok"}} {float(len(pairs))}'
                 in worker.get("/metrics")[1], 30, 0.2, "the worker to process every message")
        yield prom, worker.get("/metrics")[1]
    finally:
        worker.__exit__()
        prom.close()


@pytest.mark.services
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


@pytest.mark.services
@needs_prometheus
def test_every_dashboard_query_is_valid_promql_and_the_key_panels_have_data(scraped):
    prom, _ = scraped
    targets = dashboard_targets()
    assert len(targets) >= 15
    empty = set()
    for title, expr in targets:
        res = prom.query(promql(expr))
        assert res["status"] == "success", f"{title}: {expr}\n{res}"
        if not res["data"]["result"]:
            empty.add(title)
    # Panels that must show something once a worker has processed traffic.
    for title in ("Input messages/s by outcome", "Tokens/s and predictions/s",
                  "Model step latency per batch", "Batch size (messages per batch)",
                  "Consumer lag per partition", "Active sessions", "Loaded model per worker",
                  "p99 end-to-end latency", "Workers up"):
        assert title in {t for t, _ in targets}, title
        assert title not in empty, f"panel {title!r} shows no data"


@pytest.mark.services
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
