"""Settings: one validated object, read from ``GRU_*`` env vars and CLI flags, built once.

Nested sections map to env names with a double underscore, for example
``GRU_KAFKA__BOOTSTRAP_SERVERS`` or ``GRU_REDIS__URL``. A setting that also has a command-line
flag declares it here, once (``flag("--bootstrap")``); ``__main__`` derives its argparse
options from these declarations, and tests/test_config.py checks the README's table against
them. ``__main__`` builds the object and passes it down; nothing reads the environment
anywhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError


def flag(name: str, common: bool = False) -> dict:
    """``json_schema_extra`` of a setting with a command-line flag; ``common``: every
    subcommand has it (``produce``, ``tail``, ``topics``), not only ``run``."""
    return {"flag": name, "common": common}


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers",
                                   json_schema_extra=flag("--bootstrap", common=True))
    client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="the Kafka client library: kafka-python (pure Python), or "
        "confluent (confluent-kafka on librdkafka: a lower CPU floor per message; pip install "
        "'gru-stream[rdkafka]'); both take the same settings",
        json_schema_extra=flag("--kafka-client", common=True))
    input_topic: str = Field("tokens", description="the topic of token messages to consume",
                             json_schema_extra=flag("--input-topic", common=True))
    output_topic: str = Field("predictions", description="the topic predictions are produced to",
                              json_schema_extra=flag("--output-topic", common=True))
    dlq_topic: str = Field("tokens.dlq", description="the dead-letter topic: rejected input "
                           "with its reason")
    checkpoint_topic: str = Field("", description="where each commit's checkpoint record "
                                  "goes (recovery's replay start, who moved the offsets, "
                                  "rollouts); created with the input's partition count if "
                                  "missing (default: <input_topic>.checkpoints)")
    group_id: str = Field("gru-worker", description="consumer group id",
                          json_schema_extra=flag("--group"))
    client_id: str = "gru-worker"
    partitions: int = Field(6, ge=1, description="partition count used by `topics create` "
                            "and create_topics")
    replication_factor: int = Field(1, ge=1)
    create_topics: bool = Field(False, description="at start, create the input, output and "
                                "dead-letter topics that do not exist (partitions, "
                                "replication_factor), as `topics create` does; off: a missing "
                                "topic stops the worker with one line naming it")
    session_timeout_ms: int = Field(10_000, ge=1000, description="the group drops a member "
                                    "it has not heard from for this long",
                                    json_schema_extra=flag("--session-timeout-ms"))
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="heartbeats to the group "
                                       "coordinator; at most a third of the session timeout",
                                       json_schema_extra=flag("--heartbeat-interval-ms"))
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Outputs are sent without a flush (their acknowledgements are awaited while the next
    # batch is processed), so linger is latency: a short one still groups a batch's records
    # into few requests, as the main thread hands them over faster than the sender drains.
    linger_ms: int = Field(2, ge=0)
    producer_batch_bytes: int = Field(262_144, ge=1024)
    commit_interval_ms: int = Field(100, ge=0, description="commit acknowledged offsets at "
                                    "most this often (0: after every batch), and always at a "
                                    "rebalance, when input pauses and at shutdown; a crash "
                                    "redelivers at most this much input, deduplicated")
    # Off by default: it moves the wait into the next poll and does not shorten the tail
    # (docs/latency.md).
    async_commits: bool = Field(False, description="inside the loop, send commits without "
                                "waiting for the coordinator's answer (a failed one is carried "
                                "into the next; commits before a claim and at shutdown always "
                                "wait)")
    fetch_max_wait_ms: int = Field(20, ge=0, description="broker-side wait for a fetch to fill; "
                                   "bounds the latency an idle partition adds")
    fetch_max_bytes: int = Field(16 << 20, ge=1024, description="most (compressed) bytes one "
                                 "fetch response may carry, all partitions together; a batch "
                                 "larger than this still comes when it is first in line, up "
                                 "to the topic's max.message.bytes (docs/security.md)")
    max_partition_fetch_bytes: int = Field(1 << 20, ge=1024, description="most (compressed) "
                                           "bytes one fetch takes from one partition, same "
                                           "exception")
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4", description="compression of what the worker produces (predictions, dead "
        "letters); every codec is decoded on input whatever this says")
    request_timeout_ms: int = Field(10_000, ge=100, description="longest wait for a commit, "
                                    "an offset lookup or leaving the group")
    # Security, passed through to kafka-python unchanged (to librdkafka under its names).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def client_options(self) -> dict:
        """Connection and security options shared by the consumer, producer and admin."""
        opts: dict = {"bootstrap_servers": self.bootstrap_servers.split(","),
                      "client_id": self.client_id, "security_protocol": self.security_protocol}
        for name in ("sasl_mechanism", "sasl_plain_username", "ssl_cafile", "ssl_certfile",
                     "ssl_keyfile"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.sasl_plain_password is not None:
            opts["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        return opts


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class RedisSettings(BaseModel):
    url: str = Field("redis://127.0.0.1:6379/0",
                     description="redis:// or rediss:// (TLS), redis+cluster:// for a Redis "
                     "Cluster, or 'memory' for the in-process store",
                     json_schema_extra=flag("--redis-url"))
    username: str | None = None
    password: SecretStr | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = Field(None, description="client certificate for mutual TLS (rediss://)")
    ssl_keyfile: str | None = None
    prefix: str = Field("gru", pattern=r"^[A-Za-z0-9_.\-]{1,64}$",
                        description="the first part of every key the worker writes",
                        json_schema_extra=flag("--redis-prefix"))
    socket_timeout_s: float = Field(5.0, gt=0)

    @property
    def cluster(self) -> bool:
        return self.url.split("://", 1)[0] in CLUSTER_SCHEMES


class StateSettings(BaseModel):
    """How session states are kept, whatever the store."""

    namespace: str | None = Field(None, pattern=r"^[^{}]{1,200}$", description="the state and "
                                  "fencing domain (default: the consumer group id); workers "
                                  "of two groups with one namespace share states and fence "
                                  "each other")
    ttl_seconds: int = Field(86_400, ge=1, description="idle expiry, refreshed on every write")
    end_ttl_seconds: int = Field(3_600, ge=60, description="how long an ended session's "
                                 "tombstone keeps rejecting replays and re-emitting its final "
                                 "prediction; it must outlast any redelivery")
    dtype: Literal["float32", "float16"] = Field("float32", description="how h is stored",
                                                 json_schema_extra=flag("--state-dtype"))


class ModelSettings(BaseModel):
    dir: Path = Field(Path("artifacts/bbc-gru"), description="the model artifact directory",
                      json_schema_extra=flag("--model-dir"))
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the model runs "
                                                   "(auto: cuda when torch sees a GPU)",
                                                   json_schema_extra=flag("--device"))
    # 1: the worker's Kafka and Redis threads share the cores; a second torch thread costs
    # CPU for no more msg/s (docs/latency.md). Scale out with --processes instead.
    threads: int = Field(1, ge=1, description="torch intra-op threads",
                         json_schema_extra=flag("--threads"))
    dtype: Literal["float32", "float16"] = Field("float32", description="compute dtype; "
                                                 "float16 needs device cuda",
                                                 json_schema_extra=flag("--dtype"))
    cuda_graphs: bool = Field(True, description="on CUDA, replay captured graphs per batch bucket")
    previous_dir: Path | None = Field(
        None, description="during a rollout, the model that was serving until now: sessions "
        "with live state under it stay on it until they end or expire, then it is unloaded; "
        "new sessions go to --model-dir", json_schema_extra=flag("--previous-model-dir"))
    drain_check_s: float = Field(60.0, gt=0, description="how often the sessions left under "
                                 "the previous model are counted (a scan of the state store)")
    max_parameters: int = Field(100_000_000, ge=1, description="the most parameters a model "
                                "artifact may declare; checked before anything is allocated "
                                "for it (docs/security.md)")


class BatchSettings(BaseModel):
    max_records: int = Field(512, ge=1, le=16_384, description="most records polled into one "
                             "batch (a state's outbox holds at most 65,535 entries)",
                             json_schema_extra=flag("--batch-size"))
    max_wait_ms: int = Field(0, ge=0, description="extra wait for a batch to fill after its "
                             "first record; 0 takes what has arrived (batches grow with load)",
                             json_schema_extra=flag("--batch-wait-ms"))
    target_latency_ms: float = Field(20.0, ge=0, description="latency budget for one batch's "
                                     "processing time: a batch stops growing where its predicted "
                                     "time passes it (0: off, batches take up to max_records)",
                                     json_schema_extra=flag("--target-latency-ms"))
    switch_interval_ms: float = Field(0.5, gt=0, description="the interpreter's thread switch "
                                      "interval (sys.setswitchinterval; Python's default is 5): "
                                      "how long the main loop may wait for the GIL while a Kafka "
                                      "client thread holds it")
    backlog_switch_interval_ms: float = Field(5.0, ge=0, description="the switch interval while "
                                              "the budget is lifted for a backlog: fewer GIL "
                                              "hand-offs, more throughput (0: keep "
                                              "switch_interval_ms)")
    gc_freeze: bool = Field(True, description="after start-up, move every object into the "
                            "garbage collector's permanent generation (no full collection walks "
                            "the model and the clients again)")


class LimitSettings(BaseModel):
    require_key: bool = Field(True, description="dead-letter records whose Kafka key is not "
                              "their session_id; false also accepts unkeyed records (not with a "
                              "Redis Cluster; see README, 'Message contract')")
    max_tokens_per_message: int = Field(4096, ge=1)
    max_session_id_len: int = Field(256, ge=1)
    max_message_bytes: int = Field(1_000_000, ge=64)
    max_seq_gap: int = Field(1000, ge=1, le=2**53, description="dead-letter a message whose "
                             "seq is more than this past its session's last position (live, "
                             "or ended and not yet expired); nothing of it is applied. Bounds "
                             "how far one record can move a session ahead (docs/security.md)")
    tenant_header: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,100}$",
                                      description="a Kafka record header naming each record's "
                                      "tenant: a session is then (tenant, session_id), so "
                                      "one tenant's records cannot touch another's sessions; "
                                      "records without it are dead-lettered. Turn it on with "
                                      "a new GRU_STATE__NAMESPACE (docs/security.md)")
    tenant_secret: SecretStr | None = Field(None, description="with tenant_header: records "
                                            "must also carry <tenant_header>-signature, the "
                                            "HMAC of their session_id under their tenant's "
                                            "key (python -m worker tenant-key NAME)")

    @model_validator(mode="after")
    def _tenants(self) -> "LimitSettings":
        if self.tenant_secret is not None:
            if self.tenant_header is None:
                raise ValueError("limits.tenant_secret needs limits.tenant_header")
            if len(self.tenant_secret.get_secret_value()) < 16:
                raise ValueError("limits.tenant_secret must have at least 16 characters")
        return self


class OutputSettings(BaseModel):
    """Which predictions are emitted (worker/output.py). The decision is stored with the
    session's state, so replays and restarts decide the same way."""

    emit: Literal["every", "change", "final"] = Field(
        "every", description="every: a prediction per input message; change: only when the "
        "session's label differs from the last one emitted; final: only at end=true",
        json_schema_extra=flag("--emit"))
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="emit only predictions "
                                  "whose top probability is at least this",
                                  json_schema_extra=flag("--min-confidence"))


class MetricsSettings(BaseModel):
    host: str = Field("0.0.0.0", description="address of the /metrics, /healthz and /readyz "
                      "server", json_schema_extra=flag("--metrics-host"))
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port",
                      json_schema_extra=flag("--metrics-port"))
    max_connections: int = Field(64, ge=1, description="most open connections to the metrics "
                                 "port; a new one closes the oldest still sending its request")
    timeout_s: float = Field(5.0, gt=0, description="a connection's time to send its request, "
                             "and again to take the answer; then it is closed")


class RetrySettings(BaseModel):
    initial_backoff_s: float = Field(0.1, gt=0)
    max_backoff_s: float = Field(5.0, gt=0)
    stall_after_s: float = Field(300.0, gt=0, description="/healthz fails when the worker holds "
                                 "partitions with input waiting and has advanced none of them "
                                 "for this long")
    release_after_s: float = Field(900.0, gt=0, description="a worker retrying a dependency "
                                   "with no progress for this long leaves the group and exits "
                                   "(code 3), so that a healthy member takes its partitions")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRU_", env_nested_delimiter="__",
                                      extra="ignore")

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    state: StateSettings = StateSettings()
    model: ModelSettings = ModelSettings()
    batch: BatchSettings = BatchSettings()
    limits: LimitSettings = LimitSettings()
    output: OutputSettings = OutputSettings()
    metrics: MetricsSettings = MetricsSettings()
    retry: RetrySettings = RetrySettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="the worker's own log level",
        json_schema_extra=flag("--log-level", common=True))
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line (timestamp, level, logger, "
        "message and the record's extra fields), for log shippers",
        json_schema_extra=flag("--log-format", common=True))
    library_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="log level of the Kafka and Redis client libraries (their INFO "
        "is connection chatter)")
    startup_timeout_s: float = Field(15.0, gt=0, description="how long start-up waits for "
                                     "Kafka and Redis to answer before it stops with one line "
                                     "naming the unreachable one (exit code 2)")
    max_messages: int | None = Field(None, ge=1, description="stop after this many input messages",
                                     json_schema_extra=flag("--max-messages"))
    idle_exit_s: float | None = Field(None, gt=0, description="stop after this long with no "
                                      "input (while holding partitions)",
                                      json_schema_extra=flag("--idle-exit"))

    @field_validator("log_level", "library_log_level", mode="before")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        # Checks across settings: their messages name the env vars (and flags) involved.
        k = self.kafka
        if k.max_partition_fetch_bytes > k.fetch_max_bytes:
            raise ValueError(
                f"GRU_KAFKA__MAX_PARTITION_FETCH_BYTES {k.max_partition_fetch_bytes} must be at "
                f"most GRU_KAFKA__FETCH_MAX_BYTES {k.fetch_max_bytes}")
        if k.heartbeat_interval_ms * 3 > k.session_timeout_ms:
            raise ValueError(
                f"GRU_KAFKA__HEARTBEAT_INTERVAL_MS (--heartbeat-interval-ms) "
                f"{k.heartbeat_interval_ms} must be at most a third of "
                f"GRU_KAFKA__SESSION_TIMEOUT_MS (--session-timeout-ms) {k.session_timeout_ms}")
        if not k.checkpoint_topic:
            k.checkpoint_topic = f"{k.input_topic}.checkpoints"
        topics = {k.input_topic, k.output_topic, k.dlq_topic, k.checkpoint_topic}
        if len(topics) != 4:
            raise ValueError(
                f"GRU_KAFKA__INPUT_TOPIC (--input-topic) {k.input_topic!r}, "
                f"GRU_KAFKA__OUTPUT_TOPIC (--output-topic) {k.output_topic!r}, "
                f"GRU_KAFKA__DLQ_TOPIC {k.dlq_topic!r} and GRU_KAFKA__CHECKPOINT_TOPIC "
                f"{k.checkpoint_topic!r} must be four different topics")
        if not self.limits.require_key and self.redis.cluster:
            raise ValueError("GRU_LIMITS__REQUIRE_KEY=false cannot be used with a Redis Cluster "
                             "(GRU_REDIS__URL / --redis-url redis+cluster://): keys are placed "
                             "by partition, and unkeyed sessions span partitions")
        return self


# --- one declaration per setting: env names and flags derived from the model ---------------

@dataclass(frozen=True)
class SettingInfo:
    path: tuple[str, ...]  # ("kafka", "bootstrap_servers")
    field: Any  # pydantic FieldInfo
    flag: str | None
    common: bool

    @property
    def env(self) -> str:
        return "GRU_" + "__".join(p.upper() for p in self.path)

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def settings_info(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> Iterator[SettingInfo]:
    """Every setting (leaf field) of ``Settings``, nested sections walked in order."""
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from settings_info(ann, path + (name,))
            continue
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        yield SettingInfo(path + (name,), f, extra.get("flag"), bool(extra.get("common")))


# --- settings that cannot be right: one line each, naming the env var or flag ----------------

class ConfigError(Exception):
    """Settings that cannot be right. ``lines``: one per problem, each naming the env var (or
    the flag, when the value came from one) and the contract; ``__main__`` prints them and
    exits with code 2."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


def setting_name(info: SettingInfo, from_flag: bool) -> str:
    """``--batch-size (GRU_BATCH__MAX_RECORDS)`` when the value came from the flag, else
    ``GRU_BATCH__MAX_RECORDS (--batch-size)`` (or the env name alone)."""
    if info.flag and from_flag:
        return f"{info.flag} ({info.env})"
    return f"{info.env} ({info.flag})" if info.flag else info.env


def _contract(error: dict) -> str:
    """What a pydantic error says the value must be, in a few words."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be an integer"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}"
    bounds = {"greater_than_equal": ("at least", "ge"), "greater_than": ("greater than", "gt"),
              "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx[key]}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    if kind == "value_error":
        return str(ctx.get("error") or error["msg"].removeprefix("Value error, "))
    msg = error["msg"].removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def _secret(info: SettingInfo) -> bool:
    return "SecretStr" in str(info.field.annotation)


def explain(error: ValidationError, from_flags: frozenset[tuple[str, ...]] = frozenset()
            ) -> list[str]:
    """One line per error of ``Settings(...)``: the env var or flag, the contract and the
    value given (never a secret's). ``from_flags``: the paths whose value came from a flag."""
    infos = {i.path: i for i in settings_info()}
    lines = []
    for e in error.errors():
        loc = tuple(str(x) for x in e["loc"])
        info = next((infos[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in infos), None)
        contract = _contract(e)
        if info is None:  # a check across settings: its message names them
            where = ".".join(loc)
            lines.append(f"{where}: {contract}" if where else contract)
            continue
        given = e.get("input")
        shown = isinstance(given, (str, int, float, bool)) and e["type"] != "value_error"
        got = f", got {given!r}" if shown and not _secret(info) else ""
        lines.append(f"{setting_name(info, info.path in from_flags)}: {contract}{got}")
    return lines


def load_settings(overrides: dict | None = None,
                  from_flags: frozenset[tuple[str, ...]] = frozenset()) -> Settings:
    """``Settings(**overrides)`` (flags) over the environment, or ``ConfigError`` with a line
    per problem."""
    try:
        return Settings(**(overrides or {}))
    except ValidationError as e:
        raise ConfigError(explain(e, from_flags)) from None
    except SettingsError as e:  # a section given as one env var that is not JSON
        raise ConfigError([str(e)]) from None


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """``GRU_*`` variables that name no setting (a typo is otherwise silently ignored), each
    with the closest known name."""
    known = {i.env for i in settings_info()}
    known |= {"GRU_" + i.path[0].upper() for i in settings_info() if len(i.path) > 1}
    out = []
    for name in sorted(environ):
        if name.startswith("GRU_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
            out.append(f"{name} is not a setting and is ignored"
                       + (f" (did you mean {close[0]}?)" if close else ""))
    return out
