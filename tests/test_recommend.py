"""Recommendation policies on hand-built fronts: the rule, the tie-breaks, the no-point case."""

from __future__ import annotations

import math

import pytest

from dmdopt.errors import UserError
from dmdopt.search.recommend import (
    format_policy,
    pareto_front,
    parse_policy,
    points_from_summary,
    recommend,
)

REF = {"cost_bpe": 600.0, "val_rel_l2": 0.1}


def pts(*rows: tuple[int, float, float]) -> list[dict]:
    return [{"number": n, "cost_bpe": c, "val_rel_l2": e} for n, c, e in rows]


def test_pareto_front_drops_dominated_and_non_finite_points():
    front = pareto_front(pts((0, 100, 0.2), (1, 200, 0.1), (2, 250, 0.15), (3, 100, 0.25),
                             (4, 300, math.nan), (5, math.inf, 0.01), (6, 200, 0.1)))
    assert [p["number"] for p in front] == [0, 1, 6]  # 2, 3 dominated; 6 duplicates 1


def test_knee_picks_the_bend_of_the_front():
    # normalised: (50,.30)->0, (100,.10)->.626, (150,.05)->.676, (400,.04)->0 below the line
    points = pts((0, 50, 0.30), (1, 100, 0.10), (2, 150, 0.05), (3, 400, 0.04), (4, 200, 0.2))
    assert recommend(points, REF) == 2
    assert recommend(points, REF, policy="knee") == 2


def test_knee_with_one_or_two_points_and_ties():
    assert recommend(pts((7, 100, 0.2)), REF) == 7
    assert recommend(pts((1, 100, 0.2), (2, 300, 0.05)), REF) == 2  # nothing bends: accuracy
    # P (c'=.2, e'=.2) and Q (c'=.3, e'=.1) are equally far below the line: lower error wins
    front = pts((0, 0, 1.1), (1, 2, 0.3), (2, 3, 0.2), (3, 10, 0.1))
    assert recommend(front, REF) == 2
    # identical points: the lower trial number wins, whatever the input order
    front = pts((0, 0, 1.1), (9, 3, 0.2), (4, 3, 0.2), (3, 10, 0.1))
    assert recommend(front, REF) == 4
    assert recommend(list(reversed(front)), REF) == 4


def test_max_error_ratio_takes_the_cheapest_point_within_the_ratio():
    points = pts((0, 100, 0.2), (9, 200, 0.104), (4, 200, 0.104), (2, 300, 0.09))
    assert recommend(points, REF, policy="max-error-ratio", value=1.05) == 4  # 0.104 <= 0.105
    assert recommend(points, REF, policy="max-error-ratio=1.0") == 2
    assert recommend(points, REF, policy="max-error-ratio=3") == 0


def test_budget_takes_the_most_accurate_affordable_point():
    points = pts((0, 100, 0.2), (9, 200, 0.104), (4, 200, 0.104), (2, 300, 0.09))
    assert recommend(points, REF, policy="budget", value=250) == 4
    assert recommend(points, REF, policy="budget=300") == 2
    assert recommend(points, REF, policy="budget=100") == 0


def test_no_qualifying_point_is_a_user_error_that_says_why():
    points = pts((0, 100, 0.2), (1, 300, 0.09))
    with pytest.raises(UserError, match=r"budget=50.*cheapest, trial 0"):
        recommend(points, REF, policy="budget", value=50)
    with pytest.raises(UserError, match=r"max-error-ratio=0.5.*0.05"):
        recommend(points, REF, policy="max-error-ratio", value=0.5)
    # trial 1 is on the front but plain training (600 bpe, 0.1) dominates it: the message
    # names the points it chose among, or "the most accurate, trial 0" reads as false
    points = pts((0, 100, 0.2), (1, 650, 0.15))
    with pytest.raises(UserError, match=r"no Pareto point of the 1 \(of 2\) that beat plain "
                                        r"training.*most accurate of those, trial 0"):
        recommend(points, REF, policy="max-error-ratio", value=1.0)
    with pytest.raises(UserError, match=r"of the 1 \(of 2\).*cheapest of those, trial 0"):
        recommend(points, REF, policy="budget", value=50)
    with pytest.raises(UserError, match="no completed trial"):
        recommend([], REF)
    with pytest.raises(UserError, match="no completed trial"):
        recommend(pts((0, math.inf, 0.1)), REF)
    with pytest.raises(UserError, match="reference"):
        recommend(points, None, policy="max-error-ratio", value=1.05)


@pytest.mark.parametrize(("text", "value", "expected"), [
    ("knee", None, ("knee", None)),
    (" KNEE ", None, ("knee", None)),
    ("max-error-ratio=1.05", None, ("max-error-ratio", 1.05)),
    ("max_error_ratio=1.05", None, ("max-error-ratio", 1.05)),
    ("budget=300", None, ("budget", 300.0)),
    ("max-error-ratio", 1.05, ("max-error-ratio", 1.05)),
    ("budget", "300", ("budget", 300.0)),
])
def test_parse_policy_accepts_both_forms(text, value, expected):
    assert parse_policy(text, value) == expected
    assert parse_policy(format_policy(*expected)) == expected


@pytest.mark.parametrize(("text", "value", "needle"), [
    ("elbow", None, "'elbow'"),
    ("", None, "''"),
    ("budget", None, "needs a value"),
    ("budget=", None, "needs a value"),
    ("budget=abc", None, "'abc'"),
    ("budget=-1", None, "'-1'"),
    ("max-error-ratio=nan", None, "'nan'"),
    ("knee=3", None, "'3'"),
    ("knee", 2.0, "2.0"),
    ("budget=300", 5.0, "5.0"),
])
def test_parse_policy_rejects_bad_input_naming_the_value(text, value, needle):
    with pytest.raises(UserError) as info:
        parse_policy(text, value)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_points_from_summary_uses_the_pareto_list_and_single_objective_errors():
    summary = {
        "pareto": [0, 2],
        "trials": [
            {"number": 0, "state": "COMPLETE", "values": [100.0, 0.2], "user_attrs": {}},
            {"number": 1, "state": "COMPLETE", "values": [90.0, 0.3], "user_attrs": {}},
            {"number": 2, "state": "COMPLETE", "values": [50.0], "user_attrs": {"val_error": 0.4}},
            {"number": 3, "state": "FAIL", "values": None, "user_attrs": {}},
        ],
    }
    assert points_from_summary(summary) == pts((0, 100.0, 0.2), (2, 50.0, 0.4))
    del summary["pareto"]
    assert [p["number"] for p in points_from_summary(summary)] == [0, 1, 2]


def test_a_point_plain_training_dominates_is_never_recommended():
    """A trial that never reaches the reference's error is charged its whole spend: it may sit
    on the front (here the most accurate point, so the knee took it) and still be worse than
    not using DMD at all."""
    reference = {"cost_bpe": 600.0, "val_rel_l2": 0.10}
    points = [{"number": 0, "cost_bpe": 380.0, "val_rel_l2": 0.16},
              {"number": 1, "cost_bpe": 640.0, "val_rel_l2": 0.105}]
    assert recommend(points, reference) == 0
    assert recommend(points, reference, policy="budget", value=700) == 0
    assert recommend(points, None) == 1  # without a reference, nothing to compare with
    with pytest.raises(UserError, match="no trial beats plain training"):
        recommend(points[1:], reference)


def test_plain_training_itself_is_no_recommendation_when_its_curve_ends_noisy():
    """The reference's curve touched its final error at 136 of 600 bpe; a trial that kept no
    jump is that curve: it 'reaches' the error at 136 (4.42x against the budget, fp x 1.0)
    and the knee picked it over a real DMD trial."""
    reference = {"cost_bpe": 600.0, "val_rel_l2": 0.10, "first_passage_bpe": 136.0}
    plain_again = {"number": 2, "cost_bpe": 136.0, "val_rel_l2": 0.10}
    dmd = {"number": 5, "cost_bpe": 300.0, "val_rel_l2": 0.09}
    assert recommend([plain_again, dmd], reference) == 5
    with pytest.raises(UserError, match="no trial beats plain training"):
        recommend([plain_again], reference)
    faster = {"number": 7, "cost_bpe": 120.0, "val_rel_l2": 0.10}  # beats the first passage
    assert recommend([faster], reference) == 7


def test_plain_training_at_another_thread_count_does_not_beat_it_in_error():
    """A trial that kept no jump, run by one of two workers (1 thread against the reference's
    2), ended 5.48e-10 below the reference's error: recommended as beating plain training."""
    reference = {"cost_bpe": 200.0, "val_rel_l2": 0.7315, "first_passage_bpe": 200.0}
    plain_again = {"number": 2, "cost_bpe": 203.0, "val_rel_l2": 0.7315 - 5.48e-10}
    with pytest.raises(UserError, match="no trial beats plain training"):
        recommend([plain_again], reference)
    better = {"number": 3, "cost_bpe": 203.0, "val_rel_l2": 0.7315 * (1 - 1e-5)}
    assert recommend([plain_again, better], reference) == 3


def test_numpy_numbers_are_points_like_any_other():
    """A front built from a DataFrame has numpy scalars: they were dropped as "not numbers",
    leaving "no completed trial ... to recommend from"."""
    import numpy as np

    points = [{"number": 0, "cost_bpe": np.int64(500), "val_rel_l2": np.float32(0.2)},
              {"number": 1, "cost_bpe": 300.0, "val_rel_l2": np.float64(0.3)}]
    assert [p["number"] for p in pareto_front(points)] == [1, 0]
    assert recommend(points, {"cost_bpe": np.float64(600.0), "val_rel_l2": 0.25},
                     policy="max-error-ratio=1.0") == 0
