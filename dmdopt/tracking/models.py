"""Production training runs with the trained torch model, via `mlflow.pytorch`.

`mlflow.pytorch.log_model` only attaches to the fluent active run, so this module (unlike
runs.py) briefly resumes the run it created by id, inside a scoped tracking URI, and leaves the
caller's global MLflow state as it found it. The model is pickled (by reference to its class
in dmdopt.model), so loading needs dmdopt installed and gives back the same class.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec
from torch import nn

from dmdopt._util import with_sql_driver
from dmdopt.tracking.runs import (
    fail_fast,
    flatten,
    get_or_create_experiment,
    log_batch,
    open_client,
    resolve_tracking_uri,
)


def _import_mlflow_pytorch():
    """`import mlflow.pytorch`, leaving the root logger as it was: MLflow's Lightning autolog
    module calls logging.basicConfig(level=ERROR) on import, which silenced every warning of
    the importing program (production's "differs from the trial" warning among them)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import mlflow.pytorch as module

    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    return module


mlflow_pytorch = _import_mlflow_pytorch()
MODEL_NAME = "model"


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Point the fluent API at `uri` for the block, then restore the previous URI."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # private helper moved: fall back to set/restore
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
        return
    with _use_tracking_uri(uri):
        yield


class _NoPickleCaution(logging.Filter):
    """MLflow warns on every pickled save that unpickling can run code. dmdopt pickles on
    purpose (the docstring above says why) and only ever loads models it logged itself, so the
    caution is dropped from `dmdopt train`'s output; every other MLflow warning stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")


@contextlib.contextmanager
def _quiet_pickle_caution() -> Iterator[None]:
    logger, caution = logging.getLogger("mlflow.pytorch"), _NoPickleCaution()
    logger.addFilter(caution)
    try:
        yield
    finally:
        logger.removeFilter(caution)


def _signature(model: nn.Module) -> ModelSignature | None:
    """Tensor signature from the regressor's scaling buffers (no input example needed)."""
    x_mean, y_mean = getattr(model, "x_mean", None), getattr(model, "y_mean", None)
    if not isinstance(x_mean, torch.Tensor) or not isinstance(y_mean, torch.Tensor):
        return None
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, x_mean.numel()))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, y_mean.numel()))]))


def check_store(tracking_uri: str | None) -> None:
    """Raise if the tracking store cannot be used (a bad URI, an unreachable server), so that a
    production run finds out before it trains, not after."""
    uri = resolve_tracking_uri(tracking_uri)
    fail_fast(uri)
    open_client(uri)


def log_model_run(*, tracking_uri: str | None, experiment: str, run_name: str, model: nn.Module,
                  params: dict | None = None, metrics: dict[str, float] | None = None,
                  tags: dict[str, str] | None = None) -> str:
    """Create a finished run holding params, final metrics and the model at `model/`."""
    from mlflow.entities import Metric

    uri = resolve_tracking_uri(tracking_uri)
    fail_fast(uri)
    client = open_client(uri)
    run = client.create_run(get_or_create_experiment(client, experiment, uri),
                            run_name=run_name, tags={"dmdopt.role": "production", **(tags or {})})
    run_id = run.info.run_id
    try:
        now = run.info.start_time
        log_batch(client, run_id, params=flatten(params or {}),
                   metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()])
        with _tracking_uri(uri), mlflow.start_run(run_id=run_id,
                                                  nested=mlflow.active_run() is not None), \
                _quiet_pickle_caution():
            mlflow_pytorch.log_model(
                model, name=MODEL_NAME, signature=_signature(model),
                # MLflow 3.17 defaults to "pt2" (torch.export: needs an input example and loads
                # back a GraphModule); pickle keeps the real class (dmdopt.model, importable)
                serialization_format="pickle",
                # explicit requirements skip MLflow's slow inference subprocess
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_exists(tracking_uri: str | None, run_id: str) -> bool:
    """Whether `run_id` is a finished, not deleted run of the store (a production re-run
    that trained nothing new reuses it instead of logging a copy)."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        run = MlflowClient(tracking_uri=with_sql_driver(uri)).get_run(run_id)
    except MlflowException:  # absent (another store, or purged)
        return False
    return run.info.lifecycle_stage == "active" and run.info.status == "FINISHED"


def load_logged_model(tracking_uri: str | None, run_id: str, *,
                      map_location: str | torch.device = "cpu") -> nn.Module:
    """The torch module logged by `log_model_run` (on the CPU unless told otherwise)."""
    uri = resolve_tracking_uri(tracking_uri)
    with _tracking_uri(with_sql_driver(uri)):
        return mlflow_pytorch.load_model(f"runs:/{run_id}/{MODEL_NAME}",
                                         map_location=map_location)
