"""Fixtures for tracking tests: hand-built CONTRACT.md summaries and one shared sqlite store.

A fresh MLflow sqlite database costs seconds of schema migration, so the store is created once
per session and every test isolates itself with its own study (= experiment) name.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from html.parser import HTMLParser

import pytest

_names = itertools.count()


def _trial(number: int, state: str, window: int, rank: float, horizon: float | str,
           cost: float | None = None, err: float | None = None) -> dict:
    trial = {"number": number, "state": state, "surplus": False,
             "params": {"window": window, "rank": rank, "horizon": horizon},
             "values": [cost, err] if cost is not None else None, "user_attrs": {},
             "datetime_start": f"2026-01-01T10:{number:02d}:00",
             "datetime_complete": None if state == "RUNNING" else f"2026-01-01T10:{number:02d}:30"}
    if cost is not None:
        trial["user_attrs"] = {
            "cost_total": cost * 1.25, "cost_to_reference": cost, "val_error": err,
            "test_error": err * 1.02, "wall_time": 3.0 + number, "speedup": 600.0 / cost,
            "jumps_accepted": 5 + number, "jumps_rejected": 2, "reached_reference": True,
            "curve": [[c + 0.4, 0.5 * 0.97 ** (c / 10) + err] for c in range(0, int(cost), 50)]
            + [[cost * 1.25, err]],
            "training": {"optimizer": "adam", "lr": 1e-3, "max_steps": 600, "batch_size": None},
            "dmd": {"window": window, "rank": rank, "horizon": horizon, "grouping": "layer"}}
    elif state == "FAIL":
        trial["user_attrs"] = {"fail_reason": "loss became NaN at step 12"}
    return trial


def build_summary(study_name: str = "quick", *, storage: str = "sqlite:///dmdopt-runs/optuna.db",
                  complete: bool = True) -> dict:
    """Five trials: three COMPLETE (one with an `inf` horizon), one FAIL, one RUNNING."""
    trials = [_trial(0, "COMPLETE", 20, 8, 100.0, 300.0, 0.07),
              _trial(1, "COMPLETE", 10, 4, "inf", 200.0, 0.09),
              _trial(2, "FAIL", 30, 12, 1000.0),
              _trial(3, "COMPLETE", 40, 0.99, 10.0, 450.0, 0.065),
              _trial(4, "RUNNING", 15, 3, 50.0)]
    summary = {
        "study_name": study_name, "metric_names": ["cost_bpe", "val_rel_l2"],
        "storage": storage,
        "config": {"study": {"name": study_name, "sampler": "nsga2", "n_trials": 5,
                             "storage": storage},
                   "training": {"lr": 1e-3, "max_steps": 600},
                   "search": {"window": {"low": 5, "high": 40}, "horizon": {"include_inf": True}}},
        "reference": {"cost_bpe": 600.0, "val_rel_l2": 0.08, "test_rel_l2": 0.081,
                      "cost_total": 600.0, "wall_time": 12.3,
                      "curve": [[c, 0.5 * 0.97 ** (c / 10) + 0.075] for c in range(0, 601, 50)]},
        "trials": trials, "pareto": [1, 0, 3], "recommended": {"number": 0, "policy": "knee"},
        "hypervolume_history": [[1, 100.0], [2, 150.0], [3, 170.0]],
        "hypervolume_reference_point": [900.0, 0.12],
    }
    if not complete:  # a study where nothing finished well yet
        summary["trials"] = [trials[2], trials[4]]
        summary.update(reference=None, pareto=[], recommended=None, hypervolume_history=[])
    return summary


@pytest.fixture(scope="session")
def make_summary() -> Callable[..., dict]:
    return build_summary


@pytest.fixture
def study_name() -> str:
    """A study name no other test in this session uses."""
    return f"study-{next(_names)}"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated sqlite tracking URI (artifacts land beside it, in the same tmp dir)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # runs the schema migration once
    return uri


class _RefCollector(HTMLParser):
    """Every URL the browser would fetch on its own: script/img/iframe src, link href."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "img": "src", "iframe": "src", "link": "href"}.get(tag)
        self.refs += [v or "" for k, v in attrs if k == wanted]


def external_refs(html: str) -> list[str]:
    """Fetched URLs that leave the machine (http, https or protocol-relative)."""
    parser = _RefCollector()
    parser.feed(html)
    return [r for r in parser.refs if r.strip().lower().startswith(("http://", "https://", "//"))]


@pytest.fixture(scope="session")
def find_external_refs() -> Callable[[str], list[str]]:
    return external_refs
