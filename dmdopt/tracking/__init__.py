"""MLflow tracking and the offline study dashboard (the only place dmdopt imports mlflow).

Consumes the plain-dict study summary of `dmdopt/search/CONTRACT.md`, never optuna. Names are
imported lazily: rendering a dashboard should not pay for importing mlflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StudyTracker": "runs",
    "DEFAULT_TRACKING_URI": "runs",
    "render_dashboard": "dashboard",
    "write_dashboard": "dashboard",
    "start_ui": "ui",
    "wait_until_up": "ui",
    "stop_ui": "ui",
    "log_model_run": "models",
    "load_logged_model": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
