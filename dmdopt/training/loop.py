"""The training loop: plain backprop, optionally accelerated by DMD jumps.

Read it top to bottom: data to device, model + optimiser, then one straight loop of
backprop steps; after each optimiser step the accelerator (if any) records a snapshot and,
at the end of a window, tries a DMD jump; every `eval_every` steps a monitoring evaluation
appends a point to the learning curve. Cost is counted as it is spent (see `cost.py`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dmdopt._util import atomic_file, deferred_interrupts, out_of_memory
from dmdopt.model import ModelConfig, Regressor, build_regressor
from dmdopt.training.config import DMDConfig, TrainConfig
from dmdopt.training.cost import CostCounter, flops_per_backprop


class Diverged(RuntimeError):
    """Training produced a non-finite or exploding loss."""


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit this run (another model, optimiser or DMD window)."""


@dataclass
class TrainResult:
    """Everything a training run produced, apart from the weights (in `model`)."""

    curve: list[dict]  # points: step, cost, wall, train_error, val_error
    metrics: dict[str, float]  # val_/test_ mse, rel_l2, r2
    cost: dict[str, float]  # backprop_steps, forward_passes, dmd_flops, backprop_equivalent
    wall_time: float
    dmd_time: float  # the accelerator's own work: snapshots, POD/DMD, forming candidates
    jumps_accepted: int
    jumps_rejected: int
    device: str
    stopped_by: str  # "budget" | "target"
    model: nn.Module | None = field(default=None, repr=False)
    # the closure calls that accept or reject a jump (their cost is in `cost` already)
    forward_time: float = 0.0

    @property
    def val_error(self) -> float:
        return self.metrics["val_rel_l2"]

    @property
    def backprop_equivalent(self) -> float:
        return self.cost["backprop_equivalent"]

    def cost_to_reach(self, error: float) -> tuple[float, float] | None:
        """(bpe cost, wall time) of the first curve point after a step with val_error <= error,
        if any. The starting point never counts (as for the reference's `to_target`): a
        target at or above the starting error is not "reached" at cost 0."""
        for point in self.curve:
            if point["step"] > 0 and point["val_error"] <= error:
                return point["cost"], point["wall"]
        return None

    def to_dict(self) -> dict:
        return {
            "curve": self.curve, "metrics": self.metrics, "cost": self.cost,
            "wall_time": self.wall_time, "dmd_time": self.dmd_time,
            "forward_time": self.forward_time, "jumps_accepted": self.jumps_accepted, "jumps_rejected": self.jumps_rejected,
            "device": self.device, "stopped_by": self.stopped_by,
        }


_ACCEPT_SEED_OFFSET = 0x5EED  # the accept rows' generator: not the batch generator's seed


def resolve_device(name: str, *, source: str = "training.device") -> torch.device:
    """'auto' -> the first CUDA device when present (or the one CUDA_VISIBLE_DEVICES leaves), else CPU.

    `source` names where the value came from in the error (a config field, or `--device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{source} is {name!r} but no CUDA device is visible")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{source} is {name!r} but only {torch.cuda.device_count()} "
                         "CUDA device(s) are visible")
    return device


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


@torch.no_grad()
def evaluate(model: Regressor, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 4096) -> dict:
    """MSE, relative L2 (Frobenius over the split) and R^2 (variance-weighted) in raw units."""
    from sklearn.metrics import r2_score

    model.eval()
    pred = torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train()
    err = pred.double() - y.double()
    mse = float((err ** 2).mean())
    rel = float(torch.linalg.norm(err) / torch.linalg.norm(y.double()))
    if not math.isfinite(mse):
        return {"mse": math.inf, "rel_l2": math.inf, "r2": -math.inf}
    r2 = float(r2_score(y.cpu().numpy(), pred.cpu().numpy(), multioutput="variance_weighted"))
    return {"mse": mse, "rel_l2": rel, "r2": r2}


def train(
    *,
    dataset,
    model: ModelConfig | None = None,
    training: TrainConfig | None = None,
    dmd: DMDConfig | None = None,
    progress: bool = False,
    on_eval: Callable[[dict], None] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train the regressor on `dataset` (a `dmdopt.problem.Dataset`), optionally with DMD.

    `on_eval(point)` is called after every learning-curve point (a study uses it to stop
    diverging or hopeless trials by raising). With `checkpoint_path`, the full state (weights,
    optimiser, accelerator, RNG, curve, cost) is written atomically every `checkpoint_every`
    steps and a run that finds an existing checkpoint resumes from it, bit for bit.
    """
    # flushing denormals is a CPU mode that outlives the call: put back the caller's after it
    flushed = denormals_flushed()
    try:
        return _train(dataset=dataset, model=model, training=training, dmd=dmd,
                      progress=progress, on_eval=on_eval, checkpoint_path=checkpoint_path,
                      checkpoint_every=checkpoint_every)
    finally:
        torch.set_flush_denormal(flushed)


def denormals_flushed() -> bool:
    """Whether the CPU now flushes denormal floats to zero (torch has no getter for it)."""
    return bool((torch.full((1,), 1e-40, dtype=torch.float32) * 1.0).item() == 0.0)


_SNAPSHOT_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def _refuse_what_cannot_fit(n_params: int, training: TrainConfig, dmd: DMDConfig | None,
                            device: torch.device) -> None:
    """MemoryError (one line at the CLI, exit 2) when the weights, their gradients, the
    optimiser's state and the DMD window alone exceed the device's whole memory. Linux hands
    out memory it does not have, so such a run was not refused but killed by the OOM killer
    (exit 137, no message), at risk to whatever else the machine runs. Activations come on
    top: this is a floor, and a run that passes may still not fit."""
    states = 2 if training.optimizer == "adam" else int(training.momentum > 0)
    need = n_params * 4 * (2 + states)
    if dmd is not None and (dmd.snapshot_device == "same" or device.type == "cpu"):
        need += dmd.window * n_params * _SNAPSHOT_BYTES[dmd.snapshot_dtype]
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
            return
    if need > have:
        raise MemoryError(
            f"{n_params:,} parameters need at least {need / 2**30:,.1f} GiB (weights, gradients, "
            f"optimiser state{', DMD window' if dmd is not None else ''}), more than the "
            f"{have / 2**30:,.1f} GiB of {device.type}")


def _train(*, dataset, model, training, dmd, progress, on_eval, checkpoint_path,
           checkpoint_every) -> TrainResult:
    """`train`'s body."""
    from dmdopt.training.accelerator import DMDAccelerator

    model_config = model or ModelConfig()
    config = training or TrainConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny SGD updates otherwise hit slow denormal paths

    # --- data, on the training device ------------------------------------------------------
    x_train_np, y_train_np = dataset.split("train")
    x_val_np, y_val_np = dataset.split("val")
    x_test_np, y_test_np = dataset.split("test")
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)  # noqa: E731
    x_train, y_train = as_t(x_train_np), as_t(y_train_np)
    x_val, y_val, x_test, y_test = as_t(x_val_np), as_t(y_val_np), as_t(x_test_np), as_t(y_test_np)
    n_train = len(x_train)
    batch_rows = min(config.batch_size or n_train, n_train)

    # --- model, optimiser, accelerator ------------------------------------------------------
    _refuse_what_cannot_fit(model_config.n_parameters(x_train_np.shape[1], y_train_np.shape[1]),
                            config, dmd, device)
    net = build_regressor(model_config, x_train_np, y_train_np).to(device)
    y_train_scaled = net.scale_targets(y_train)
    optimizer = make_optimizer(net.parameters(), config)
    n_params = sum(p.numel() for p in net.parameters())
    cost = CostCounter(flops_per_backprop=flops_per_backprop(n_params, batch_rows))
    batch_gen = torch.Generator(device="cpu").manual_seed(config.seed)

    # The accelerator's accept test sees the whole training set, or a fixed subset of it
    # (`accept_rows`), drawn from its own generator so the batches are those of a plain run.
    x_accept, y_accept = x_train, y_train_scaled
    if config.accept_rows is not None and config.accept_rows < n_train:
        pick = torch.Generator(device="cpu").manual_seed(config.seed + _ACCEPT_SEED_OFFSET)
        rows = torch.randperm(n_train, generator=pick)[:config.accept_rows].to(device)
        x_accept, y_accept = x_train[rows], y_train_scaled[rows]

    @torch.no_grad()
    def train_loss() -> torch.Tensor:
        """Training loss on the accept rows, forward only: the accelerator's accept/reject test."""
        total = torch.zeros((), device=device)
        for i in range(0, len(x_accept), 4096):
            pred = net.forward_scaled(x_accept[i:i + 4096])
            total += ((pred - y_accept[i:i + 4096]) ** 2).sum()
        return total / y_accept.numel()

    accelerator = None
    if dmd is not None:
        accelerator = DMDAccelerator(net, optimizer, dmd, cost=cost,
                                     forward_weight=len(x_accept) / batch_rows)

    state: dict[str, Any] = {"step": 0, "curve": [], "wall": 0.0, "perm": None, "pos": 0,
                             "first_loss": None, "stopped_by": None}
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and ckpt.exists():
        # onto the CPU: the RNG states must stay there (a CUDA run's resume failed otherwise);
        # the loads below copy weights, moments and snapshots onto the training device
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        try:
            net.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            if accelerator is not None and saved.get("accelerator") is not None:
                accelerator.load_state_dict(saved["accelerator"])
            batch_gen.set_state(saved["batch_gen"])
            torch.set_rng_state(saved["torch_rng"])
            cost = CostCounter(**{k: v for k, v in saved["cost"].items() if k != "backprop_equivalent"})
        except (KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            if out_of_memory(exc):
                raise  # a good checkpoint on a full device: not the checkpoint's fault
            first = " ".join(str(exc).split())[:160]
            raise CheckpointMismatch(f"checkpoint {ckpt} does not fit this run "
                                     f"({type(exc).__name__}: {first})") from None
        if accelerator is not None:
            accelerator.cost = cost
        state = saved["state"]
        # A run cut by its budget off the evaluation schedule (max_steps not a multiple of
        # eval_every) ended with a point an uninterrupted longer run never records, and may
        # have met its target there. Extending it drops that point, so the curve and the stop
        # are those of the uninterrupted run.
        last = state["curve"][-1] if state["curve"] else None
        if (last is not None and state["step"] < config.max_steps
                and last["step"] == state["step"] and state["step"] % config.eval_every):
            state["curve"].pop()
            if state.get("stopped_by") == "target":
                state["stopped_by"] = None

    def save_checkpoint() -> None:
        # a kill mid-save leaves the previous checkpoint; a Ctrl-C or SIGTERM waits for the
        # save to end (inside torch.save it surfaced as a RuntimeError from the zip writer)
        with deferred_interrupts(), atomic_file(ckpt, "wb") as fh:
            torch.save({
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "accelerator": accelerator.state_dict() if accelerator is not None else None,
                "batch_gen": batch_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cost": cost.to_dict(), "state": state,
            }, fh)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if batch_rows == n_train:
            return x_train, y_train_scaled
        if state["perm"] is None or state["pos"] + batch_rows > n_train:
            state["perm"] = torch.randperm(n_train, generator=batch_gen)
            state["pos"] = 0
        idx = state["perm"][state["pos"]:state["pos"] + batch_rows].to(device)
        state["pos"] += batch_rows
        return x_train[idx], y_train_scaled[idx]

    def record_point() -> dict:
        val = evaluate(net, x_val, y_val)
        tr = evaluate(net, x_train, y_train)
        point = {"step": state["step"], "cost": cost.backprop_equivalent, "wall": state["wall"],
                 "train_error": tr["rel_l2"], "val_error": val["rel_l2"]}
        state["curve"].append(point)
        if not math.isfinite(val["rel_l2"]):
            raise Diverged(f"validation error is {val['rel_l2']} at step {state['step']}")
        if on_eval is not None:
            on_eval(point)
        return point

    bar = _progress_bar(config.max_steps, enabled=progress)
    try:
        if not state["curve"]:
            record_point()  # the starting point of the learning curve, cost 0
        bar.advance(state["step"])
        while state["step"] < config.max_steps and state.get("stopped_by") is None:
            t0 = time.perf_counter()
            # ---- one backprop step ----
            xb, yb = next_batch()
            optimizer.zero_grad(set_to_none=True)
            loss = ((net.forward_scaled(xb) - yb) ** 2).mean()
            loss.backward()
            optimizer.step()
            cost.backprop_steps += 1
            state["step"] += 1
            loss_value = loss.item()  # syncs the device, so wall time below is honest
            if state["first_loss"] is None:
                state["first_loss"] = loss_value
            if not math.isfinite(loss_value) or loss_value > 1e6 * max(state["first_loss"], 1e-12):
                raise Diverged(f"training loss is {loss_value:.3g} at step {state['step']}")
            # ---- DMD: snapshot, and at the end of a window a jump (kept only if it helps) ----
            if accelerator is not None:
                accelerator.step(train_loss)
            state["wall"] += time.perf_counter() - t0
            bar.advance(1, loss=loss_value)
            # ---- monitoring, not counted as cost ----
            if state["step"] % config.eval_every == 0 or state["step"] == config.max_steps:
                point = record_point()
                bar.note(val_error=point["val_error"])
                if config.target_error is not None and point["val_error"] <= config.target_error:
                    state["stopped_by"] = "target"
                    break
            if ckpt is not None and checkpoint_every and state["step"] % checkpoint_every == 0:
                save_checkpoint()
    finally:
        bar.close()

    if state["curve"][-1]["step"] != state["step"]:
        record_point()
    val = evaluate(net, x_val, y_val)
    test = evaluate(net, x_test, y_test)
    metrics = {f"val_{k}": v for k, v in val.items()} | {f"test_{k}": v for k, v in test.items()}
    stats = accelerator.stats if accelerator is not None else {}
    if ckpt is not None:
        save_checkpoint()
    return TrainResult(
        curve=state["curve"], metrics=metrics, cost=cost.to_dict(), wall_time=state["wall"],
        dmd_time=stats.get("dmd_seconds", 0.0),
        jumps_accepted=stats.get("jumps_accepted", 0), jumps_rejected=stats.get("jumps_rejected", 0),
        device=str(device), stopped_by=state.get("stopped_by") or "budget", model=net,
        forward_time=stats.get("forward_seconds", 0.0),
    )


class _progress_bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._progress = None
        self._fields: dict[str, float] = {}
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=Console(stderr=True), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, info="")

    def _info(self) -> str:
        return "  ".join(f"{k} {v:.4g}" for k, v in self._fields.items())

    def advance(self, n: int, **fields: float) -> None:
        if self._progress is not None:
            self._fields.update(fields)
            self._progress.update(self._task, advance=n, info=self._info())

    def note(self, **fields: float) -> None:
        self.advance(0, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
