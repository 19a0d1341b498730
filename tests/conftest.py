"""The test suite's tiers, and where its shared fixtures come from.

Every test belongs to one tier, a marker registered in pyproject.toml:

- ``unit`` (tier 1): a function or a component alone, in this process;
- ``fakes`` (tier 2): the whole loop on in-memory fakes of Kafka and Redis;
- ``services`` (tier 3): real tansu, redis-server or Prometheus;
- ``sim`` (tier 4): the deterministic fault simulator (tests/sim).

A module says its tier with ``pytestmark``; a module of two tiers marks each test (or
parameter) instead. ``heavy`` (training, a Keras fit, a subprocess to start) and ``slow`` add
to the tier. ``make test-fast`` runs ``unit`` and ``fakes`` without ``heavy`` or ``slow``;
``make test`` runs everything. Collection fails on a test without exactly one tier.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures"]

TIERS = ("unit", "fakes", "services", "sim")


def _tier_of(item: pytest.Item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in TIERS}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Imported here, not above: pytest imports tests.fixtures first, as a plugin (so that its
    # asserts are rewritten).
    from .fixtures import SERVICE_FIXTURES
    problems = []
    for item in items:
        tiers = _tier_of(item)
        if not tiers:
            problems.append(f"{item.nodeid}: no tier; mark it with one of {', '.join(TIERS)} "
                            f"(a whole module: pytestmark = pytest.mark.unit)")
        elif len(tiers) > 1:
            problems.append(f"{item.nodeid}: {len(tiers)} tiers ({', '.join(sorted(tiers))}); "
                            f"keep one")
        elif tiers != {"services"} and (used := SERVICE_FIXTURES & set(item.fixturenames)):
            problems.append(f"{item.nodeid}: takes {', '.join(sorted(used))}, a real service, "
                            f"but is marked {tiers.pop()}, not services")
    if problems:
        raise pytest.UsageError("tests without their tier:\n  " + "\n  ".join(problems))
