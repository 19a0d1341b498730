"""Settings: one validated object, read from ``GRU_*`` env vars and CLI flags, built once.

Nested sections map to env names with a double underscore, for example
``GRU_KAFKA__BOOTSTRAP_SERVERS`` or ``GRU_REDIS__URL``. A setting that also has a command-line
flag declares it here, once (``flag("--bootstrap")``); ``__main__`` derives its argparse
options from these declarations, and tests/test_config.py checks the README's table against
them. ``__main__`` builds the object and passes it down; nothing reads the environment
anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def flag(name: str, common: bool = False) -> dict:
    """``json_schema_extra`` of a setting with a command-line flag; ``common``: every
    subcommand has it (``produce``, ``tail``, ``topics``), not only ``run``."""
    return {"flag": name, "common": common}


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers",
                                   json_schema_extra=flag("--bootstrap", common=True))
    input_topic: str = Field("tokens", json_schema_extra=flag("--input-topic", common=True))
    output_topic: str = Field("predictions", json_schema_extra=flag("--output-topic", common=True))
    dlq_topic: str = "tokens.dlq"
    checkpoint_topic: str = Field("", description="where each commit's checkpoint record "
                                  "goes (recovery's replay start, who moved the offsets, "
                                  "rollouts); created with the input's partition count if "
                                  "missing (default: <input_topic>.checkpoints)")
    group_id: str = Field("gru-worker", description="consumer group id",
                          json_schema_extra=flag("--group"))
    client_id: str = "gru-worker"
    partitions: int = Field(6, ge=1, description="partition count used by `topics create`")
    replication_factor: int = Field(1, ge=1)
    session_timeout_ms: int = Field(10_000, ge=1000,
                                    json_schema_extra=flag("--session-timeout-ms"))
    heartbeat_interval_ms: int = Field(3_000, ge=100,
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
    async_commits: bool = Field(False, description="inside the loop, send commits without "
                                "waiting for the coordinator's answer (a failed one is carried "
                                "into the next; commits before a claim and at shutdown always "
                                "wait). Off: measured, it moved the wait into the next poll "
                                "and did not shorten the tail (docs/latency.md)")
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
    # Security, passed through to kafka-python unchanged.
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
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", json_schema_extra=flag("--device"))
    threads: int = Field(1, ge=1, description="torch intra-op threads. 1 by default: the "
                         "worker's Kafka and Redis threads share the cores, and on a 2-core VM a "
                         "second torch thread took ~30 us more CPU a message for the same msg/s and "
                         "a higher demo latency (docs/benchmarks.md); scale with --processes",
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
    host: str = Field("0.0.0.0", json_schema_extra=flag("--metrics-host"))
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port",
                      json_schema_extra=flag("--metrics-port"))
    max_connections: int = Field(64, ge=1, description="most open connections to the metrics "
                                 "port; a new one closes the oldest still sending its request")
    timeout_s: float = Field(5.0, gt=0, description="a connection's time to send its request, "
                             "and again to take the answer; then it is closed")


class RetrySettings(BaseModel):
    initial_backoff_s: float = Field(0.1, gt=0)
    max_backoff_s: float = Field(5.0, gt=0)


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
        "INFO", json_schema_extra=flag("--log-level", common=True))
    max_messages: int | None = Field(None, ge=1, description="stop after this many input messages",
                                     json_schema_extra=flag("--max-messages"))
    idle_exit_s: float | None = Field(None, gt=0, description="stop after this long with no "
                                      "input (while holding partitions)",
                                      json_schema_extra=flag("--idle-exit"))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.kafka.max_partition_fetch_bytes > self.kafka.fetch_max_bytes:
            raise ValueError("kafka.max_partition_fetch_bytes must be at most "
                             "kafka.fetch_max_bytes")
        if self.kafka.heartbeat_interval_ms * 3 > self.kafka.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be at most a third of "
                             "kafka.session_timeout_ms")
        if not self.kafka.checkpoint_topic:
            self.kafka.checkpoint_topic = f"{self.kafka.input_topic}.checkpoints"
        k = self.kafka
        topics = {k.input_topic, k.output_topic, k.dlq_topic, k.checkpoint_topic}
        if len(topics) != 4:
            raise ValueError("kafka input, output, dlq and checkpoint topics must be four "
                             "different topics")
        if not self.limits.require_key and self.redis.cluster:
            raise ValueError("limits.require_key=false cannot be used with a Redis Cluster: keys "
                             "are placed by partition, and unkeyed sessions span partitions")
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
