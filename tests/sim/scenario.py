"""A scenario: the settings, the workload and the fault schedule of one run, all chosen by a
seed. A run of a scenario is deterministic, so a seed (or a shrunk scenario saved as JSON)
replays exactly."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from . import faults as faults_mod
from . import workload
from .faults import Fault
from .workload import Config, Send


@dataclass(frozen=True)
class Scenario:
    seed: int
    config: Config
    sends: tuple[Send, ...]
    faults: tuple[Fault, ...]

    @property
    def horizon(self) -> float:
        """When the last record is sent or the last fault is due."""
        return max([s.at for s in self.sends] + [f.at for f in self.faults] + [0.0])

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "config": dataclasses.asdict(self.config),
                           "sends": [dataclasses.astuple(s) for s in self.sends],
                           "faults": [dataclasses.asdict(f) for f in self.faults]},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        d = json.loads(text)
        return cls(d["seed"], Config(**d["config"]), tuple(Send(*s) for s in d["sends"]),
                   tuple(Fault(**f) for f in d["faults"]))

    def describe(self) -> str:
        """The schedule, one line per fault and per session, for a failure report."""
        c = self.config
        lines = [(f"seed {self.seed}: {c.partitions} partitions, {c.workers} workers, "
                  f"max_records={c.max_records}, commit_interval_ms={c.commit_interval_ms}, "
                  f"async_commits={c.async_commits}, emit={c.emit}, "
                  f"min_confidence={c.min_confidence}, assignor={c.assignor}, "
                  f"rollout_at={c.rollout_at}")]
        for f in self.faults:
            args = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(f).items()
                             if k not in ("kind", "at") and v not in ("", -1, 0.0, False))
            lines.append(f"  fault t={f.at:8.3f} {f.kind}" + (f" ({args})" if args else ""))
        for s in self.sends:
            tag = f"  [{s.hostile}]" if s.hostile else ""
            lines.append(f"  send  t={s.at:8.3f} key={s.key!r} {s.value}{tag}")
        return "\n".join(lines)


def generate(seed: int) -> Scenario:
    rng = random.Random(seed)
    cfg, sends = workload.generate(rng)
    horizon = max(s.at for s in sends) + 30
    return Scenario(seed, cfg, tuple(sends), tuple(faults_mod.generate(rng, cfg, horizon)))
