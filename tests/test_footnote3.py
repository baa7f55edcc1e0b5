"""experiments.studies.footnote3 (docs/math.md §6.2, Footnote 3): the statistics against a direct numpy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.studies.footnote3 import (
    STAT_NAMES,
    Footnote3Result,
    footnote3_statistics,
    format_statistics,
    summary_stats,
)


def _direct(values: np.ndarray) -> dict[str, float]:
    v = np.sort(values.ravel())
    n = v.size

    def quantile(q: float) -> float:  # linear interpolation between order statistics (torch.quantile)
        pos = q * (n - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    return {"mean": v.sum() / n, "min": v[0], "q1": quantile(0.25), "median": quantile(0.5), "q3": quantile(0.75),
            "max": v[-1], "fraction_positive": np.count_nonzero(v > 0) / n}  # fmt: skip


def test_summary_stats_by_hand():
    stats = summary_stats(np.array([[-1.0, 0.0], [2.0, 3.0]]))
    assert stats == {"mean": 1.0, "min": -1.0, "q1": -0.25, "median": 1.0, "q3": 2.25, "max": 3.0,
                     "fraction_positive": 0.5, "count": 4}  # fmt: skip


def test_statistics_match_a_direct_computation():
    from theory.maxmargin import max_margin_direction

    rng = np.random.default_rng(0)
    D = 12
    shift = rng.normal(size=D)
    seen = rng.normal(size=(20, D)) + 2 * shift  # separable from the origin
    unseen_train = rng.normal(size=(8, D)) + shift
    unseen_test = rng.normal(size=(6, D)) - 0.2 * shift
    u = max_margin_direction(seen).direction
    stats = footnote3_statistics(seen, unseen_train, unseen_test, u)
    for name, other in (("unseen_train", unseen_train), ("unseen_test", unseen_test)):
        inner = np.array([[a @ b for b in other] for a in seen])
        cosine = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in other] for a in seen])
        for what, values in (("inner", inner), ("cosine", cosine)):
            expected = _direct(values)
            got = stats[f"seen·{name} {what}"]
            for s in STAT_NAMES:
                assert got[s] == pytest.approx(expected[s], rel=1e-12, abs=1e-12), (name, what, s)
            assert got["count"] == 20 * len(other)
    for name, other in (("seen", seen), ("unseen_train", unseen_train), ("unseen_test", unseen_test)):
        cos_u = np.array([u @ b / (np.linalg.norm(u) * np.linalg.norm(b)) for b in other])
        for s in STAT_NAMES:
            assert stats[f"u*·{name} cosine"][s] == pytest.approx(_direct(cos_u)[s], rel=1e-12, abs=1e-12)
    assert stats["u*·seen cosine"]["fraction_positive"] == 1.0  # ⟨u*, z_i⟩ ≥ 1 > 0 for every seen difference
    assert 0.0 < stats["seen·unseen_test cosine"]["fraction_positive"] < 1.0
    assert "u*·seen cosine" not in footnote3_statistics(seen, unseen_train, unseen_test, None)


def test_result_serializes_and_prints(tmp_path):
    rng = np.random.default_rng(1)
    seen = rng.normal(size=(5, 4)) + 3.0
    stats = footnote3_statistics(seen, rng.normal(size=(3, 4)), rng.normal(size=(2, 4)))
    result = Footnote3Result(stats, {"separable": False, "reason": "test"}, {"seen": (5, 4)}, {"model": "x"})
    data = json.loads(result.save(tmp_path / "footnote3.json").read_text())
    assert data["statistics"]["seen·unseen_train inner"]["count"] == 15 and data["shapes"]["seen"] == [5, 4]
    text = format_statistics(result)
    assert "fraction_positive" in text and "u*: none (test)" in text
