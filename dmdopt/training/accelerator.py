"""`DMDAccelerator`: POD + DMD weight extrapolation as a plug-in for any PyTorch loop.

    acc = DMDAccelerator(model, optimizer, DMDConfig())
    for batch in loader:
        ...; loss.backward(); optimizer.step()
        acc.step(closure)   # closure() -> loss tensor, forward only, used to accept/reject

After each optimiser step the accelerator copies the model's trainable parameters, grouped by
`DMDConfig.grouping` (not the optimiser's param_groups; a parameter the optimiser holds but the
model does not register is never extrapolated), into snapshot buffers (`window` rows). When the
buffer is full it fits one affine-exact DMD per group (`dmdopt.dmd.fit_dmd`) and runs a **line
search over the horizon** with forward passes only: candidates horizon x factor (or, for
horizon=inf, damped steps now + f (inf-state - now)) are tried from the smallest step to the
largest, and the search stops at the first candidate that is worse than the previous one once
some candidate has improved on the current loss, or at the second rise in a row before any has
(a non-finite loss counts as a rise; the loss along the ladder is close to unimodal; this keeps
the forward passes to ~3 per jump). The best candidate is kept **only if the closure's loss
improves** on the current weights; otherwise the weights are rolled back bit for bit. Either
way a fresh window starts. The model's buffers (e.g. BatchNorm running statistics, which a
closure run in train mode updates) are put back before every closure call, so no candidate sees
another's update; a kept jump then keeps the buffers its own closure call left (as after one
train-mode forward at the kept weights: statistics of the weights kept, not of the ones left),
a rejected one the buffers from before the test. A window holding a non-finite snapshot makes
its Gram non-finite and the jump is rejected before any forward pass, so NaN never reaches the
weights; a candidate that moves no weights (every mode dropped) is skipped without one. Every
closure call of a jump sees the same random numbers (a dropout layer draws the same masks for
each candidate, so the test compares weights, not noise) and leaves torch's default generators
(CPU, and CUDA) as they were. A closure that draws its check batch from its own
`torch.Generator`, a loader's iterator, `numpy` or `random` gets a new batch at every call
(each candidate judged on other data) and advances that stream: pick the check batch once,
outside the closure. An exception or Ctrl-C inside a closure rolls the weights and buffers back
before it propagates. The DMD maths runs outside any autocast region the caller opened (the
closure keeps it).

Data-parallel training: pass the `DistributedDataParallel`-wrapped model. Its ranks then
score every candidate by the closure's loss averaged over the DDP's process group, so they
keep the same jumps and their weights stay equal (each on its own shard, they drifted apart).
`torch.compile` of the DDP model is seen through. Another wrapper (FSDP, a hand-made
all-reduce) is not detected: with it, average the loss over the ranks inside the closure, and
give every rank the same parameters to snapshot. A closure that raises on one rank only
leaves the ranks' all-reduces unpaired (gloo aborts, NCCL hangs until its watchdog): let the
error end the job on every rank.

Cost: every closure call is added to the `CostCounter` (`forward_weight` batches each), the
fits (`dmd_flops`) and every extra candidate (2pr + p per group for a predict, 3p for a damped
step) to its DMD FLOPs. `stats` holds: `jumps_accepted`, `jumps_rejected`; `forward_passes`,
the closure calls (the `CostCounter` gets `forward_weight` times that); `dmd_flops`;
`dmd_seconds`, the accelerator's own wall time (snapshots, linear algebra, forming candidates);
`forward_seconds`, the closures'; `chosen_horizons`, each kept jump's horizon in steps, or
under horizon=inf either inf (the converged state) or the factor f < 1 of a damped step.

Defaults (`DMDConfig`; measured on the quick benchmark, `dmdopt bench --quick`, one seed
each, cost to reach the plain run's final validation error relative to plain cost):
  * horizon 20 with the geometric ladder x(1/4, 1, 4, 16, ..., 1024), i.e. 5..20480 steps:
    Adam picks 5-20 steps, GD 20-5000; a fixed horizon is wrong for one of them. Adam:
    0.76 (h100, factors 1, 1/4, 1/16) -> 0.70 (ladder); GD lr 1: 0.44 (h100) -> 0.26.
  * rank 0.99 (energy): Adam 0.70 (rank 8) -> 0.63; GD at lr 8 preferred rank 8 (0.29 vs
    0.59 with window 10/20), so rank is worth tuning per optimiser in a study.
  * window 20: 40 was worse for GD (0.72 vs 0.26 at lr 1), 10 similar but more forwards.
  * grouping 'layer'.
Growing modes (`growing`, see `dmdopt.dmd.extrapolate`), measured on the default problem
(`python benchmarks/bench_dmd.py --methods gd --dmd growing=drift,rank=18`, 3 seeds; run then as
rank=19, which the DMD clipped to the window's 18 modes): GD at
lr 8 runs at its stability edge, where the drift of a window often sits in modes with
|lambda| slightly > 1; 'drop' leaves those windows with nothing to extrapolate (a flat
ladder). 'drift' at full rank cut GD's cost to plain's error from 0.68x to 0.48x; for Adam,
'drift' was worse (0.87 -> 1.08x over the same seeds). Hence the default 'auto': 'drift'
under SGD (with momentum 0.9 at lr 2: 0.905 -> 0.85x), 'drop' under anything else.
The line-search stop rule (second rise in a row before any improvement) cut Adam's cost
ratio from 0.874 to 0.845 over 3 seeds (a rejected jump tried the whole ladder before);
GD's stayed 0.684.
Optimiser state after a kept jump (`optimizer_state`): 'keep' leaves Adam's moments / SGD's
momentum as they were -- they describe the local gradient statistics, which a jump along the
slow modes changes little; 'reset' clears them (Adam then re-warms its bias correction).
'keep' is the default: with Adam, 'reset' lost the gain entirely (never reached the plain
error in 600 steps vs 0.70x the cost with 'keep').
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from dmdopt.training.config import DMDConfig
from dmdopt.training.cost import CostCounter

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def _real(p: torch.Tensor) -> torch.Tensor:
    """The parameter's coordinates as a real tensor sharing its storage: a complex parameter
    (spectral / FNO layers) is its real and imaginary parts, which SGD moves as two real
    coordinates each; copying it into a real buffer kept only the real part."""
    return torch.view_as_real(p.detach()) if p.is_complex() else p.detach()


def _trainable(p: nn.Parameter) -> bool:
    """Trainable and materialised: a lazy module's parameter (`nn.LazyLinear` before its first
    forward) has no shape yet; it joins the window once it has one (`_follow_parameters`)."""
    return p.requires_grad and not is_lazy(p)


def group_parameters(model: nn.Module, grouping: str) -> list[list[nn.Parameter]]:
    """Parameter groups that share one DMD: per module ('layer'), per tensor, or all ('global')."""
    params = [p for p in model.parameters() if _trainable(p)]
    if grouping == "global":
        return [params] if params else []
    if grouping == "tensor":
        return [[p] for p in params]
    groups: list[list[nn.Parameter]] = []
    seen: set[int] = set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if _trainable(p) and id(p) not in seen]
        if own:
            groups.append(own)
            seen.update(id(p) for p in own)
    return groups


def resolve_growing(policy: str, optimizer: torch.optim.Optimizer) -> str:
    """`DMDConfig.growing` for this optimiser: 'auto' follows growing modes ('drift') under
    SGD, whose steps are a fixed linear map of the gradient, and drops them under any other
    optimiser, whose per-coordinate rescaling (Adam & co.) makes them mostly oscillation."""
    if policy != "auto":
        return policy
    return "drift" if isinstance(optimizer, torch.optim.SGD) else "drop"


class DMDAccelerator:
    """Wraps a model + optimiser; call `step(closure)` after every `optimizer.step()`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: DMDConfig,
                 *, cost: CostCounter | None = None, forward_weight: float = 1.0) -> None:
        """`forward_weight`: one closure call in units of a forward pass over a training batch
        (e.g. n_train / batch_size when the closure evaluates the whole training set)."""
        if not isinstance(config, DMDConfig):  # a dict failed later as "no attribute 'growing'"
            raise TypeError(f"DMDAccelerator: config must be a DMDConfig, got "
                            f"{type(config).__name__} (DMDConfig(**settings) makes one)")
        if isinstance(forward_weight, bool) or not isinstance(forward_weight, numbers.Real) \
                or not math.isfinite(forward_weight) or forward_weight <= 0:
            raise ValueError(f"DMDAccelerator: forward_weight must be a finite number > 0, "
                             f"got {forward_weight!r}")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.cost = cost
        self.forward_weight = float(forward_weight)
        self.growing = resolve_growing(config.growing, optimizer)
        # Under DistributedDataParallel every rank holds the same weights but scores the
        # candidates on its own shard: each rank's own verdict let the copies drift apart
        # (measured: 0.25 apart after 200 steps), and DDP never re-syncs weights. The ranks
        # therefore decide on the loss averaged over the DDP's process group.
        inner = getattr(model, "_orig_mod", model)  # torch.compile(DDP(...)) wraps the DDP
        self._sync_group = (inner.process_group
                            if isinstance(inner, nn.parallel.DistributedDataParallel) else None)
        self._lay_out()
        self.filled = 0
        self.steps_seen = 0
        # chosen_horizons: each kept jump's horizon in steps; under horizon=inf, inf for the
        # converged state itself, or the factor f < 1 of a damped step toward it
        self.stats = {"jumps_accepted": 0, "jumps_rejected": 0, "forward_passes": 0,
                      "dmd_flops": 0.0, "dmd_seconds": 0.0, "forward_seconds": 0.0,
                      "chosen_horizons": []}

    def _layout(self) -> list[tuple]:
        """What the snapshot buffers are laid out for: each trainable parameter's identity,
        device, dtype and shape. (The groups keep the old tensors alive, so a new one never
        reuses an old one's id.)"""
        return [(id(p), p.device, p.dtype, p.shape)
                for p in self.model.parameters() if _trainable(p)]

    def _lay_out(self) -> None:
        """Groups, snapshot buffers and CUDA devices for the model's parameters as they are."""
        config = self.config
        self.groups = group_parameters(self.model, config.grouping)
        self.sizes = [sum(_real(p).numel() for p in g) for g in self.groups]
        first = self.groups[0][0] if self.groups else None
        device = torch.device("cpu") if config.snapshot_device == "cpu" or first is None else first.device
        dtype = _DTYPES[config.snapshot_dtype]
        # One row per snapshot (window x n): a step writes one contiguous row (a column of a
        # p x window buffer would be p strided writes: ~10x slower at p = 530k).
        self.buffers = [torch.empty(config.window, n, dtype=dtype, device=device) for n in self.sizes]
        self._cuda_devices = sorted({p.device for g in self.groups for p in g if p.device.type == "cuda"},
                                    key=lambda d: d.index or 0)  # whose RNG the accept test forks
        self._laid_out = self._layout()
        if config.snapshot_dtype == "float32" and any(
                _real(p).dtype == torch.float64 for g in self.groups for p in g):
            # the default: steps of a float64 model below ~1e-7 of its weights would vanish
            warnings.warn("DMDAccelerator: float64 parameters are recorded in float32 snapshots, "
                          "which round away their steps below about 1e-7 of the weights (late "
                          "in training, whole steps) before the DMD fit; snapshot_dtype="
                          "'float64' keeps them", stacklevel=3)

    def _follow_parameters(self) -> None:
        """After load_state_dict(assign=True), a module moved to another device or dtype, or
        layers added or frozen, the old tensors are no longer the model's, and snapshots of
        them would move nothing (jumps silently wasted): start an empty window on the new
        ones. Checked at every step, and before a state is saved or loaded."""
        if self._layout() == self._laid_out:
            return
        log.info("DMDAccelerator: the model's trainable parameters changed (replaced, moved, "
                 "added or frozen); the snapshot window restarts")
        self._lay_out()
        self.filled = 0

    @classmethod
    def from_config(cls, path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    **kwargs) -> DMDAccelerator:
        """An accelerator with the `[dmd]` settings of a tuned config (TOML/JSON/YAML): a file
        from `dmdopt export`, or one holding only `schema_version` and a complete `[dmd]`.
        Settings tuned for one optimiser may not suit another (window 10 helps SGD and hurts
        Adam), so an optimiser other than the file's `[training] optimizer` gets a warning, as
        does SGD with momentum for settings tuned without it, and the other way round."""
        from dmdopt.export import load_dmd_settings

        dmd, training = load_dmd_settings(path)
        tuned_for, momentum = training.get("optimizer"), training.get("momentum")
        kinds = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # AdamW is an Adam
        wanted, this = repr(tuned_for), type(optimizer).__name__
        differs = tuned_for in kinds and not isinstance(optimizer, kinds[tuned_for])
        if not differs and tuned_for == "sgd" and isinstance(momentum, (int, float)):
            # plain GD and heavy ball are tuned apart (window 10 suits one, 20 the other)
            ours = optimizer.defaults.get("momentum") or 0.0
            differs = (momentum > 0) != (ours > 0)
            wanted, this = f"'sgd' with momentum {momentum:g}", f"SGD with momentum {ours:g}"
        if differs:
            warnings.warn(f"{path}: its DMD settings were tuned for training.optimizer = "
                          f"{wanted}, and this optimiser is {this}: they may not suit it (tune "
                          "them for it in a study)", stacklevel=2)
        return cls(model, optimizer, dmd, **kwargs)

    @property
    def snapshot_bytes(self) -> int:
        """Memory held by the snapshot buffers: window x parameters x bytes."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    # -------------------------------------------------------------------------------------------
    def _flat(self, group: list[nn.Parameter]) -> torch.Tensor:
        """The group's parameters as one new flat tensor (a copy)."""
        return torch.cat([_real(p).reshape(-1) for p in group])

    @torch.no_grad()
    def _record(self, group: list[nn.Parameter], row: torch.Tensor) -> None:
        """Copy the group's parameters straight into a snapshot row (no temporary)."""
        offset = 0
        for p in group:
            coords = _real(p)
            n = coords.numel()
            row[offset:offset + n].copy_(coords.reshape(-1))
            offset += n

    @torch.no_grad()
    def _assign(self, group: list[nn.Parameter], flat: torch.Tensor) -> None:
        offset = 0
        for p in group:
            coords = _real(p)  # writes through to a complex parameter
            n = coords.numel()
            coords.copy_(flat[offset:offset + n].view_as(coords).to(coords.dtype))
            offset += n

    @staticmethod
    def _moved(now: torch.Tensor, move: torch.Tensor | None) -> torch.Tensor:
        """The weights `now` + a DMD displacement, in the weights' own dtype: with half
        snapshots only the move is rounded, never the weights. No (or a non-finite) move:
        the weights themselves."""
        if move is None:
            return now
        flat = now + move.to(now.device, now.dtype)
        return flat if bool(torch.isfinite(flat).all()) else now

    def _loss(self, closure: Callable[[], torch.Tensor]) -> float:
        """The closure's loss, forward only. Every call of one jump sees the same random
        numbers (a dropout layer draws the same masks for each candidate, so the test compares
        weights, not noise), and the caller's RNG streams are left as they were."""
        t0 = time.perf_counter()
        cuda = self._cuda_devices  # the model's, wherever the snapshots are kept
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(self.steps_seen)  # this jump's draw
            for dev in cuda:
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(self.steps_seen)
            # autocast caches its low-precision copy of each weight for the rest of its
            # region: without this, every candidate after the first was scored with the
            # first one's weights (measured: all losses equal, no jump ever kept)
            torch.clear_autocast_cache()
            value = float(closure())
            if self._sync_group is not None:
                value = self._mean_over_ranks(value)
        self.stats["forward_passes"] += 1
        self.stats["forward_seconds"] += time.perf_counter() - t0
        if self.cost is not None:
            self.cost.forward_passes += self.forward_weight
        return value if math.isfinite(value) else math.inf

    def _mean_over_ranks(self, value: float) -> float:
        """The closure's loss averaged over the DDP's ranks (NaN/inf anywhere: everywhere)."""
        import torch.distributed as dist

        device = next((p.device for g in self.groups for p in g), torch.device("cpu"))
        if "nccl" not in str(dist.get_backend(self._sync_group)):  # also "cuda:nccl,cpu:gloo"
            device = torch.device("cpu")  # gloo and mpi reduce CPU tensors
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self._sync_group)
        return float(total) / dist.get_world_size(self._sync_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> bool | None:
        """Record a snapshot; at the end of a window try a jump. Returns True/False when a jump
        was kept/rejected, None otherwise."""
        self.steps_seen += 1
        if self.steps_seen <= self.config.warmup:
            return None
        t0 = time.perf_counter()
        self._follow_parameters()
        if not self.groups:  # everything frozen: no window, and no jump to count as rejected
            self.stats["dmd_seconds"] += time.perf_counter() - t0
            return None
        for buf, group in zip(self.buffers, self.groups, strict=True):
            self._record(group, buf[self.filled])
        self.filled += 1
        self.stats["dmd_seconds"] += time.perf_counter() - t0
        if self.filled < self.config.window:
            return None
        self.filled = 0
        return self._jump(closure)

    def _candidates(self) -> list[tuple[float, float, float]]:
        """(step size key, reported horizon, factor) of each line-search candidate, smallest
        step first. Finite horizon: h = horizon * factor. inf: factor 1 is the converged state,
        factor f < 1 the damped step now + f (inf-state - now)."""
        cfg = self.config
        out = []
        for factor in cfg.line_search or (1.0,):
            if math.isinf(cfg.horizon):
                if factor > 1.0:  # past the converged state: no meaning, only wasted forwards
                    continue
                out.append((factor, math.inf if factor == 1.0 else factor, factor))
            else:
                out.append((cfg.horizon * factor, cfg.horizon * factor, factor))
        return sorted(out) or [(1.0, math.inf, 1.0)]

    def _jump(self, closure: Callable[[], torch.Tensor]) -> bool:
        from dmdopt.dmd import dmd_flops, fit_dmd

        cfg = self.config
        t0 = time.perf_counter()
        fits = []
        for buf in self.buffers:
            fit = fit_dmd(buf.T, rank=cfg.rank)  # (p x m) view of the rows
            fits.append(fit)
            self._charge(dmd_flops(buf.shape[1], buf.shape[0], fit.rank, gram_passes=fit.gram_passes))
        # A non-finite snapshot makes its group's Gram non-finite (status "non_finite"): the
        # window is corrupt, so reject the whole jump (no forward passes spent); likewise when
        # no group has a usable fit.
        if any(f.status == "non_finite" for f in fits) or not any(f.status == "ok" for f in fits):
            self.stats["jumps_rejected"] += 1
            self.stats["dmd_seconds"] += time.perf_counter() - t0
            return False
        current = [self._flat(g) for g in self.groups]  # exact rollback point (a copy)
        # The closures run the model in its current mode: a BatchNorm in train mode would fold
        # every candidate's (mostly rejected) batch statistics into its running ones. So each
        # closure starts from these buffers, and only the kept candidate's update stays.
        buffers = self._save_buffers()
        targets = None
        if math.isinf(cfg.horizon):
            targets = [self._moved(now, f.displacement(math.inf))
                       for f, now in zip(fits, current, strict=True)]
        self.stats["dmd_seconds"] += time.perf_counter() - t0

        best_params = best_buffers = None
        try:
            best_loss, best_h, best_params, best_buffers = self._line_search(
                closure, fits, targets, current, buffers)
        finally:  # also on an error or Ctrl-C in a closure: never left on a half-tested jump
            t0 = time.perf_counter()
            try:  # the weights first: a buffer that cannot be put back must not keep them
                if best_params is None:  # no candidate improved the loss: roll back exactly
                    for group, now in zip(self.groups, current, strict=True):
                        self._assign(group, now)
            finally:
                self._restore_buffers(best_buffers if best_params is not None else buffers)
                torch.clear_autocast_cache()  # no cast of a candidate's weights outlives it
        if best_params is None:
            self.stats["jumps_rejected"] += 1
            self.stats["dmd_seconds"] += time.perf_counter() - t0
            return False
        for group, flat in zip(self.groups, best_params, strict=True):
            self._assign(group, flat)
        if cfg.optimizer_state == "reset":
            self.optimizer.state.clear()
        self.stats["jumps_accepted"] += 1
        self.stats["chosen_horizons"].append(best_h)
        self.stats["dmd_seconds"] += time.perf_counter() - t0
        return True

    def _save_buffers(self) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
        """A copy of every module's buffers, by module and name."""
        return [(module, {name: buf.clone() for name, buf in module._buffers.items()
                          if buf is not None}) for module in self.model.modules()]

    @staticmethod
    def _restore_buffers(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
        """Put the saved buffers back, by module and name: in place where the buffer is still
        of that shape and dtype (a BatchNorm's statistics), else as the saved tensor (a cache a
        closure re-registered at another size). A buffer a closure added stays: the test
        compares weights, and such a buffer is the closure's own (a lazily built mask)."""
        for module, buffers in saved:
            for name, value in buffers.items():
                now = module._buffers.get(name)
                if (now is not None and now.shape == value.shape and now.dtype == value.dtype
                        and now.device == value.device):
                    now.copy_(value)
                else:
                    module._buffers[name] = value.clone()

    def _line_search(self, closure, fits, targets, current, buffers):
        """(best loss, its horizon, its weights per group, the model buffers its closure call
        left) along the ladder; weights None when no candidate beats the current loss. Every
        closure call starts from `buffers`. A candidate that moves no group (every mode
        dropped, or a non-finite move) is the current weights: skipped, no forward spent."""
        base_loss = None  # evaluated only once some candidate moves
        best_loss, best_h, best_params, best_buffers = math.inf, None, None, None
        prev_loss, rose = math.inf, False
        for n_cand, (_, horizon, factor) in enumerate(self._candidates()):
            t0 = time.perf_counter()
            candidate, moved = [], False
            for i, (fit, now) in enumerate(zip(fits, current, strict=True)):
                p, r = now.numel(), fit.rank
                if targets is not None:
                    if targets[i] is now:  # no converged state to move toward
                        flat = now
                    elif factor == 1.0:
                        flat = targets[i]
                    else:
                        flat = torch.lerp(now, targets[i], factor)
                        self._charge(3 * p)
                else:
                    move = fit.displacement(horizon, growing=self.growing)
                    if n_cand and move is not None:  # the first predict is in dmd_flops already
                        self._charge(2 * p * r + p)
                    flat = self._moved(now, move)  # `now` itself when there is no move
                moved = moved or flat is not now
                candidate.append(flat)
            self.stats["dmd_seconds"] += time.perf_counter() - t0
            if not moved:
                continue
            if base_loss is None:  # the weights the jump must beat, tested at the first move
                base_loss = self._loss(closure)
                best_loss, prev_loss = base_loss, base_loss
            t0 = time.perf_counter()
            for group, flat in zip(self.groups, candidate, strict=True):
                self._assign(group, flat)
            self._restore_buffers(buffers)  # not the previous closure call's update
            self.stats["dmd_seconds"] += time.perf_counter() - t0
            loss = self._loss(closure)
            # a non-finite loss (inf here) counts as a rise even after another: a closure
            # that is never finite stops at the second candidate, not the end of the ladder.
            # A tie is no rise: float32 (or bf16) losses on a plateau tie for a rung or two
            # before a farther candidate improves; so a flat loss walks the whole ladder.
            worse = loss > prev_loss or math.isinf(loss)
            if loss < best_loss:
                t0 = time.perf_counter()
                best_loss, best_h, best_params = loss, horizon, candidate
                best_buffers = self._save_buffers()
                self.stats["dmd_seconds"] += time.perf_counter() - t0
            elif worse and (best_params is not None or rose):
                break  # past the minimum along the (unimodal) ladder, or rising twice
            rose = worse
            prev_loss = loss
        return best_loss, best_h, best_params, best_buffers

    def _charge(self, flops: float) -> None:
        self.stats["dmd_flops"] += flops
        if self.cost is not None:
            self.cost.dmd_flops += flops

    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A copy: later steps change neither the buffers nor the stats it holds. Saved for
        the parameters as they are now: a layer frozen since the last step gives the empty
        window that step would start, so the model rebuilt as saved can load it. Only the
        window's filled rows are saved (all `window` rows made a checkpoint taken right after a
        jump 20x the model's size, for nothing)."""
        self._follow_parameters()
        return {"buffers": [b[:self.filled].clone() for b in self.buffers], "filled": self.filled,
                "window": self.config.window, "steps_seen": self.steps_seen,
                "stats": copy.deepcopy(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Resume a saved window. The buffers are first laid out for the model's trainable
        parameters as they are now (loaded with `assign=True`, frozen, moved since this
        accelerator was built): the window then carries on, not restarts at the next step.
        A window saved for other parameters (shapes, grouping, window length) is refused."""
        self._follow_parameters()
        window = self.config.window
        # the filled rows (older saves: all `window` of them); a window of another length
        # is another schedule of jumps, so it is refused like other shapes
        rows = {b.shape[0] for b in state["buffers"]}
        saved_window = state.get("window", max(rows, default=window))
        saved = [(saved_window, *tuple(b.shape)[1:]) for b in state["buffers"]]
        now = [tuple(b.shape) for b in self.buffers]
        if saved != now or not all(state["filled"] <= n <= window for n in rows):
            raise ValueError(
                f"DMDAccelerator.load_state_dict: the saved window holds {len(saved)} groups of "
                f"(window, parameters) {saved}, this model and config give {len(now)}: {now}; "
                "build the model (trainable layers, grouping, window) as it was when it was saved")
        for buf, saved_buf in zip(self.buffers, state["buffers"], strict=True):
            buf[:saved_buf.shape[0]].copy_(saved_buf)
        self.filled = state["filled"]
        self.steps_seen = state["steps_seen"]
        self.stats = copy.deepcopy(state["stats"])
