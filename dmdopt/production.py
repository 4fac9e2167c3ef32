"""Production training from a tuned config: long, resumable, checked against the study.

`run_production` reads the tuned config, builds (or loads the cached) dataset of its
[problem], trains with its [model]/[training]/[dmd] and checkpoints as it goes. The checkpoint
is named after the config's settings hash, so re-running the same command after a crash, a
Ctrl-C or a cluster pre-emption resumes where it stopped and ends bit-identical to a run that
was never interrupted (same device type and, on a CPU, the same thread count: torch's
reductions split by thread). Then:

* the achieved validation error is compared with the trial's (`[expected]`), when the step
  budget and the settings are the trial's (`expected.max_steps`, `expected.settings_hash`):
  a relative difference above `SAME_DEVICE_TOLERANCE` (1e-6, same device type, and on a
  CPU the same thread count: the run should be a replay) or `OTHER_DEVICE_TOLERANCE` (5%,
  another device type, thread count or unknown: the sums differ in their last bits, and a
  DMD jump kept by a hair in one run may be rejected in the other, so only the same
  ballpark is expected) gives one warning;
* the run, its model and metrics are logged to MLflow (tags `dmdopt.source_study`,
  `dmdopt.source_trial`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from dmdopt._util import DEFAULT_CACHE, DEFAULT_CHECKPOINTS
from dmdopt.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_DIR = Path(DEFAULT_CHECKPOINTS)
DEFAULT_EXPERIMENT = "dmdopt-production"
SAME_DEVICE_TOLERANCE = 1e-6
OTHER_DEVICE_TOLERANCE = 0.05


def checkpoint_cadence(max_steps: int, window: int) -> int:
    """About 20 checkpoints per run, at least 50 steps apart, in whole DMD windows.

    Saving costs a copy of weights, optimiser state and snapshot buffers, so not every step;
    a kill loses at most ~5% of the run. Whole windows put a checkpoint right after a DMD jump
    (when `warmup` is a multiple of the window). Resume is exact at any step either way.
    """
    target = max(50, math.ceil(max_steps / 20))
    return window * math.ceil(target / window)


def tolerance_for(expected_device: str | None, device: str, *,
                  expected_threads: int | None = None, threads: int | None = None,
                  expected_capability: str | None = None, capability: str | None = None) -> float:
    """1e-6 when the trial ran on the same device type (cpu/cuda/mps) and, on a CPU, with the
    same torch thread count and vector kernels (AVX2, AVX512, ...: each where the trial
    recorded it), else 5%."""
    kind = device.split(":")[0]
    if not expected_device or expected_device.split(":")[0] != kind:
        return OTHER_DEVICE_TOLERANCE
    if kind == "cpu":
        for recorded, now in ((expected_threads, threads), (expected_capability, capability)):
            # a study's --workers split the cores; another machine's CPU has other kernels
            if recorded is not None and now is not None and recorded != now:
                return OTHER_DEVICE_TOLERANCE
    return SAME_DEVICE_TOLERANCE


def _adopt_legacy_checkpoint(ckpt_dir: Path, legacies: list[str], key: str) -> None:
    """A checkpoint (and its MLflow marker) named by an older dmdopt's hash of these same
    settings takes the current name, so the run resumes instead of starting again."""
    if (ckpt_dir / f"{key}.pt").exists():
        return
    legacy = next((h for h in legacies if (ckpt_dir / f"{h}.pt").exists()), None)
    if legacy is None:
        return
    for suffix in (".pt", ".mlflow.json"):
        old = ckpt_dir / f"{legacy}{suffix}"
        if old.exists():
            old.rename(ckpt_dir / f"{key}{suffix}")
    logger.info("checkpoint %s.pt renamed to %s.pt (this dmdopt names equal settings alike)",
                legacy, key)


def _checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint written by `train()`; None: none yet."""
    if not path.exists():
        return None
    import torch

    try:  # tensors, dicts, numbers only: the restricted unpickler suffices
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text goes on to suggest weights_only=False, i.e. running a pickle from a
        # file that is corrupt or foreign: not advice to pass on. Its first sentence suffices.
        first = " ".join(str(exc).split()).split(". ")[0][:160]
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first}); "
                        "delete it to start over") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(saved, dict) or k not in saved]
    state = saved.get("state") if isinstance(saved, dict) else None
    if missing or not isinstance(state, dict) or not isinstance(state.get("step"), int):
        what = f"no {missing[0]!r}" if missing else "no step in its state"
        raise UserError(f"checkpoint {path} is not a dmdopt training checkpoint ({what}); "
                        "delete it to start over")
    return state["step"]


# what `train()` writes (and reads back on resume)
_CHECKPOINT_KEYS = ("model", "optimizer", "accelerator", "batch_gen", "torch_rng", "cost", "state")


def _flat_params(tuned, training) -> dict[str, Any]:
    data = tuned.to_dict()
    params: dict[str, Any] = {}
    for section in ("dmd", "training", "model", "problem"):
        for key, value in data[section].items():
            params[f"{section}.{key}"] = value
    params["training.max_steps"] = training.max_steps  # the budget; the steps run are a metric
    params["training.device"] = training.device
    return params


def _log_run(*, tracking_uri, experiment, tuned, training, result, config_path, key, summary):
    try:
        from dmdopt.tracking.models import log_model_run
    except ImportError as exc:
        logger.warning("MLflow logging skipped: dmdopt.tracking.models is not available (%s)", exc)
        return None
    from dmdopt._util import git_commit

    prov = tuned.provenance
    study, trial = prov.get("study_name"), prov.get("trial_number")
    run_name = f"production-{study}-trial{trial}" if study is not None else f"production-{key}"
    metrics = {k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    tags = {
        "dmdopt.kind": "production",
        "dmdopt.source_study": str(study) if study is not None else "",
        "dmdopt.source_trial": str(trial) if trial is not None else "",
        "dmdopt.source_policy": str(prov.get("policy", "")),
        "dmdopt.tuned_config": str(Path(config_path).resolve()),  # from any folder
        "dmdopt.config_hash": key,
        "dmdopt.dataset_hash": tuned.problem.config_hash(),
        "dmdopt.git_commit": git_commit() or "",
        # what a number cannot say: the device used (the param holds the one asked for),
        # how the run ended, and whether it reproduced the trial (absent: not compared)
        "dmdopt.device": str(summary.get("device") or ""),
        "dmdopt.stopped_by": str(summary.get("stopped_by") or ""),
    }
    if summary.get("reproduced") is not None:
        tags["dmdopt.reproduced"] = str(bool(summary["reproduced"])).lower()
    return log_model_run(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name,
                         model=result.model, params=_flat_params(tuned, training),
                         metrics=metrics, tags=tags)


def run_production(
    config_path: str | os.PathLike,
    *,
    steps: int | None = None,
    device: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    experiment: str = DEFAULT_EXPERIMENT,
    cache_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    log_mlflow: bool = True,
) -> dict:
    """Train the tuned config; resume from its checkpoint if one exists. Returns metrics,
    cost, the comparison with the trial, the checkpoint path and the MLflow run id.

    With `log_mlflow`, an unusable store is a `UserError` before any training; if logging
    fails after the training anyway, the result says why under "mlflow_error" (run_id None)
    instead of raising, so the finished run's figures are not lost."""
    from dmdopt.export import load_tuned_config
    from dmdopt.problem import load_dataset
    from dmdopt.training.loop import CheckpointMismatch, resolve_device, train

    tuned = load_tuned_config(config_path)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    try:
        training = replace(tuned.training, max_steps=steps or tuned.training.max_steps,
                           device=device or tuned.training.device)
        resolved = resolve_device(training.device)
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if device:  # the value came from --device (TrainConfig's check or the GPU's absence)
            text = text.replace("training.device", "--device", 1)
        elif "no CUDA device" in text:  # the file's: the command can run it elsewhere
            text += " (--device cpu runs it on the CPU)"
        raise UserError(text) from None
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise UserError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    every = checkpoint_every or checkpoint_cadence(training.max_steps, tuned.dmd.window)
    first = tuned.dmd.first_jump_step
    if first > training.max_steps:  # as `train --steps N --dmd-window W` refuses
        source = "--steps" if steps else "training.max_steps ="
        raise UserError(f"{source} {training.max_steps} is fewer than the DMD window "
                        f"(dmd.window = {tuned.dmd.window}"
                        + (f" after dmd.warmup = {tuned.dmd.warmup}" if tuned.dmd.warmup else "")
                        + f", in {config_path}): it never fills, so DMD would never run; pass "
                        f"--steps >= {first}")

    from dmdopt._util import os_reason

    key = tuned.settings_hash()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else DEFAULT_CHECKPOINT_DIR
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create checkpoint directory {ckpt_dir}: "
                        f"{os_reason(exc, ckpt_dir, folder=True)}") from None
    if not os.access(ckpt_dir, os.W_OK):
        raise UserError(f"checkpoint directory {ckpt_dir} is not writable")
    ckpt = ckpt_dir / f"{key}.pt"
    _adopt_legacy_checkpoint(ckpt_dir, tuned.legacy_settings_hashes(), key)
    requested_steps = training.max_steps
    start = _checkpoint_step(ckpt)
    if start is not None and start > training.max_steps:
        asked = "--steps" if steps else f"training.max_steps in {config_path}"
        raise UserError(f"checkpoint {ckpt} is at step {start}, past the {training.max_steps} "
                        f"steps {asked} asks for: pass --steps >= {start} or delete it")
    if log_mlflow:  # a bad URI or a dead server is found now, not after the training
        _check_tracking(tracking_uri)
    # A run that already stopped at its target is not trained further: train() keeps
    # `stopped_by` in the checkpoint and returns at once.
    if start and progress:
        print(f"resuming from {ckpt} at step {start}", file=sys.stderr)
    dataset = load_dataset(tuned.problem, cache_dir=cache_dir or DEFAULT_CACHE, progress=progress)
    try:
        result = train(dataset=dataset, model=tuned.model, training=training, dmd=tuned.dmd,
                       progress=progress, checkpoint_path=ckpt, checkpoint_every=every)
    except CheckpointMismatch as exc:  # right keys, wrong contents (edited or foreign)
        raise UserError(f"{exc}; delete it to start over") from None

    summary: dict[str, Any] = dict(result.metrics)
    summary.update({
        # the whole spend; `cost_to_reference` below is the study's cost objective
        "cost_total": result.cost["backprop_equivalent"],
        "backprop_steps": result.cost["backprop_steps"],
        "wall_time": result.wall_time, "dmd_time": result.dmd_time,
        "jumps_accepted": result.jumps_accepted, "jumps_rejected": result.jumps_rejected,
        "steps": result.curve[-1]["step"],
        "stopped_by": result.stopped_by,
        "device": result.device, "resumed_from_step": start or 0,
        "checkpoint": str(ckpt), "checkpoint_every": every, "config_hash": key,
        "expected_val_rel_l2": None, "val_rel_diff": None, "tolerance": None, "reproduced": None,
    })
    expected = tuned.expected.get("val_rel_l2")
    exported_on, now_on = tuned.provenance.get("dataset_hash"), tuned.problem.config_hash()
    if expected is not None and exported_on not in (None, now_on):
        # [problem] edited after the export: the trial's figures are for another dataset
        logger.warning("[problem] is not the one the trial trained on (dataset hash %s in "
                       "[provenance], %s now: the section was edited, or this dmdopt hashes it "
                       "differently): the run is not compared with [expected]", exported_on,
                       now_on)
        expected = None
    reference_error = tuned.expected.get("reference_val_rel_l2")
    if reference_error is not None and exported_on in (None, now_on):  # the trial's dataset
        # where this run first reached plain training's final error: the study's cost
        reached = result.cost_to_reach(reference_error)
        summary["cost_to_reference"] = reached[0] if reached else None
    recorded_settings = tuned.expected.get("settings_hash")
    if expected is not None and recorded_settings not in (None, key):
        logger.warning("[dmd], [training] or [model] differ from the trial's settings (settings "
                       "hash %s in [expected], %s now: edited after the export): the run is not "
                       "compared with [expected]", recorded_settings, key)
        expected = None
    # the trial's budget (older files: the file's own, which a hand edit may have changed)
    if expected is not None and requested_steps == tuned.expected.get(
            "max_steps", tuned.training.max_steps):
        import torch

        threads, capability = torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
        tol = tolerance_for(tuned.expected.get("device"), str(resolved), threads=threads,
                            expected_threads=tuned.expected.get("cpu_threads"),
                            capability=capability,
                            expected_capability=tuned.expected.get("cpu_capability"))
        diff = abs(result.val_error - expected) / max(abs(expected), 1e-300)
        summary.update(expected_val_rel_l2=expected, val_rel_diff=diff, tolerance=tol,
                       reproduced=diff <= tol)
        if "cost_to_reference" in summary:  # the trial's, to compare with
            summary["expected_cost_to_reference"] = tuned.expected.get("cost_to_reference")
        if diff > tol:
            def where(device, n, kernels):
                if device != "cpu" or not (n or kernels):
                    return device
                return f"cpu ({', '.join(filter(None, (n and f'{n} threads', kernels)))})"

            logger.warning(
                "val_rel_l2 %.6g differs from the trial's %.6g by %.3g%% (tolerance %.3g%%, "
                "trial on %s, now on %s): check the dataset, versions, device, thread count and "
                "CPU", result.val_error, expected, 100 * diff, 100 * tol,
                where(tuned.expected.get("device", "an unknown device"),
                      tuned.expected.get("cpu_threads"), tuned.expected.get("cpu_capability")),
                where(result.device, threads, capability))
    summary["run_id"] = None
    if log_mlflow:
        marker = ckpt.with_name(f"{key}.mlflow.json")  # which run holds this checkpoint's result
        try:
            # only a run whose checkpoint was already finished before this call trained
            # nothing new (a deleted .pt trains again from step 0, and is logged again)
            logged = (_logged_before(marker, tracking_uri, summary["steps"])
                      if start == summary["steps"] else None)
            if logged is not None:  # a re-run that trained nothing new: no second, identical run
                summary["run_id"], summary["already_logged"] = logged, True
                return summary
            summary["run_id"] = _log_run(tracking_uri=tracking_uri, experiment=experiment,
                                         tuned=tuned, training=training, result=result,
                                         config_path=config_path, key=key, summary=summary)
            _write_marker(marker, tracking_uri, summary["steps"], summary["run_id"])
        except Exception as exc:  # noqa: BLE001 - the trained model is safe in its checkpoint
            summary["mlflow_error"] = (
                f"training finished, but logging it to MLflow failed ({_short(exc)}); the model "
                f"is in {ckpt}: re-run the same command to log it (it resumes there, no training)")
    return summary


def _logged_before(marker: Path, tracking_uri: str | None, steps: int) -> str | None:
    """The run id this checkpoint's result was logged as, at this step count, to this store,
    if that run still exists; else None (log it)."""
    from dmdopt.tracking.models import run_exists
    from dmdopt.tracking.runs import resolve_tracking_uri

    record = _read_marker(marker).get(resolve_tracking_uri(tracking_uri))
    if not isinstance(record, dict) or record.get("steps") != steps:
        return None
    run_id = record.get("run_id")
    return run_id if isinstance(run_id, str) and run_exists(tracking_uri, run_id) else None


def _read_marker(marker: Path) -> dict:
    """{tracking URI: {"run_id", "steps"}}: one entry per store the result was logged to."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_marker(marker: Path, tracking_uri: str | None, steps: int, run_id: str) -> None:
    from dmdopt._util import atomic_file
    from dmdopt.tracking.runs import resolve_tracking_uri

    record = _read_marker(marker)
    record[resolve_tracking_uri(tracking_uri)] = {"run_id": run_id, "steps": steps}
    with atomic_file(marker) as fh:
        json.dump(record, fh)


def _short(exc: BaseException) -> str:
    """One line of an exception: its type and the start of its message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _check_tracking(tracking_uri: str | None) -> None:
    from dmdopt._util import mask_url
    from dmdopt.tracking.models import check_store
    from dmdopt.tracking.runs import check_tracking_uri, resolve_tracking_uri

    check_tracking_uri(tracking_uri)  # a URI that can never work: the same line as study run's
    try:
        check_store(tracking_uri)
    except Exception as exc:  # noqa: BLE001 - any failure means the store is unusable
        where = "--tracking-uri" if tracking_uri else "$MLFLOW_TRACKING_URI"
        raise UserError(f"MLflow tracking at {mask_url(resolve_tracking_uri(tracking_uri))} "
                        f"cannot be used ({_short(exc)}); fix {where} or pass "
                        "--no-mlflow") from None
