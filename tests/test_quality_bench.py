"""bench.quality compares the GRU with the baseline as counts of documents, not as floats."""

import numpy as np
import pytest

from bench.quality import at_least

pytestmark = pytest.mark.unit


def test_equal_counts_are_level_whatever_the_float_width():
    n = 444
    gru = {k: float(np.float32(435 / n)) for k in ("full", "p25", "p10")}
    base = {"full": 435 / n, "p25": 436 / n, "p10": 434 / n, "n_test": n}
    assert gru["full"] < base["full"]  # the trap: float32 of 435/444 reads below float64's
    assert at_least(gru, base) == {"full": True, "p25": False, "p10": True}


@pytest.mark.heavy
def test_per_epoch_scores_see_the_weights_that_are_kept(tmp_path):
    """The per-epoch hook scores the weights train() validates; with the best epoch kept, the
    saved artifact's test counts are that epoch's row."""
    from bench.quality import gru

    from .fixtures import TINY
    tiny = {k: v for k, v in TINY.items() if k not in ("seed", "quiet")}
    res = gru(0, tmp_path / "m", per_epoch=True,
              **{**tiny, "limit": 12, "epochs": 3, "patience": 3, "average_from": 0,
                 "train_on_val": False})
    rows = res["test_counts_per_epoch"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    kept = rows[res["best_epoch"] - 1]
    assert {k: kept[k] for k in ("full", "p25", "p10")} == {
        k: round(res[k] * res["n_test"]) for k in ("full", "p25", "p10")}
    assert res["seconds"] > 0


def test_set_overrides_take_each_fields_type():
    import pytest

    from bench.quality import _overrides
    assert _overrides(["train_on_val=false", "mean_dim=16", "lr=1e-3", "schedule=const"]) == {
        "train_on_val": False, "mean_dim": 16, "lr": 1e-3, "schedule": "const"}
    for bad in ("nonsense=1", "mean_dim"):
        with pytest.raises(SystemExit):
            _overrides([bad])
