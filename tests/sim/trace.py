"""What a run leaves for the oracle: the fakes' final contents and the events that change
what the right answer is (a rollout, an operator's skip), and the violations found."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.ports import Record

from .broker import Broker, Group
from .scenario import Scenario
from .store import SimRedis
from .workload import Send


@dataclass(frozen=True)
class Violation:
    kind: str  # a short name: "stall", "unanswered", "wrong-probs", ...
    detail: str
    record: tuple[int, int] | None = None  # the input record concerned: (partition, offset)

    def __str__(self) -> str:
        return f"[{self.kind}] {self.detail}"


@dataclass(frozen=True)
class Skip:
    """An operator moved the group from ``start`` to ``end`` on ``partition`` (past an
    undecodable batch) at time ``at``."""

    partition: int
    start: int
    end: int
    at: float


@dataclass
class Trace:
    scenario: Scenario
    broker: Broker
    group: Group
    redis: SimRedis
    end: float = 0.0  # simulated time when the run stopped
    rollout_offsets: dict[int, int] | None = None  # input offsets served by the old model
    upgraded_at: float | None = None
    skips: list[Skip] = field(default_factory=list)
    sent: list[tuple[Send, Record]] = field(default_factory=list)  # each send, as appended
    violations: list[Violation] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # what happened, for --verbose
    turns: int = 0
