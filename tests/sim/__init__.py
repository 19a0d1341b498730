"""A deterministic fault simulator (tier 4, docs: issue 24): the real ``Worker`` (loop, engine,
models, state rules) against in-memory Kafka and Redis, single-threaded on simulated time,
under a seeded workload and fault schedule, checked against an offline oracle.

* ``clock``: simulated time; ``broker``: topics, retention, consumer groups, commits with
  metadata, operator resets, undecodable batches, the producer; ``store``: Redis with losses,
  rollbacks, lost replies and outages; ``models``: small random-weight models for a rollout.
* ``workload`` and ``faults``: what a seed sends and what goes wrong; ``scenario``: both, as
  data that replays (JSON).
* ``wiring``: the one place where workers and fakes are built; ``run``: the scheduler;
  ``trace``: what a run leaves; ``oracle``: the ideal processor and the invariants;
  ``shrink``: a failing scenario down to a minimal one. ``python -m tests.sim --help``.
"""
