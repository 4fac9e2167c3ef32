"""Generate, cache and serve the (parameters -> field) dataset.

Fields are expensive to compute (~6 ms each at 64²) and cheap to load, so a
dataset is built once per :class:`ProblemConfig` and cached as
``<cache_dir>/<config_hash>.npz`` (float32, uncompressed, so loading the
default 2048×64² set takes tens of milliseconds). The cache is written to a
temporary file in the same directory and moved into place with ``os.replace``,
so an interrupted build never leaves something that looks like a cache. A
cache file that cannot be read or does not match its config is rebuilt.

Parameters are rounded to float32 *before* solving, so the stored ``params``
are exactly the inputs that produced the stored ``fields``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dmdopt._util import DEFAULT_CACHE, atomic_file, os_reason
from dmdopt.errors import UserError
from dmdopt.problem.config import LOG_PARAMS, PARAM_NAMES, ProblemConfig
from dmdopt.problem.sampling import SPLIT_NAMES, sample_params, split_indices
from dmdopt.problem.solver import solve_field

__all__ = ["Dataset", "build_fields", "cache_path", "load_dataset"]

_ARRAY_KEYS = ("params", "fields", "train_idx", "val_idx", "test_idx")


@dataclass(frozen=True, kw_only=True, eq=False)
class Dataset:
    """Parameters, fields and a fixed train/val/test partition of one config."""

    params: npt.NDArray[np.float32]  # (N, 6), columns in PARAM_NAMES order
    fields: npt.NDArray[np.float32]  # (N, grid, grid), first axis x
    train_idx: npt.NDArray[np.int64]
    val_idx: npt.NDArray[np.int64]
    test_idx: npt.NDArray[np.int64]
    config: ProblemConfig
    config_hash: str
    path: Path | None = field(default=None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return PARAM_NAMES

    def indices(self, name: str) -> npt.NDArray[np.int64]:
        """Sample indices of split ``name`` ("train", "val" or "test")."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name must be one of {SPLIT_NAMES}, got {name!r}")
        return getattr(self, f"{name}_idx")

    def split(self, name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(X, Y)`` of a split: X ``(n, 6)``, Y flattened to ``(n, grid*grid)``."""
        idx = self.indices(name)
        return self.params[idx], self.fields[idx].reshape(len(idx), -1)

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the ``dmdopt data`` CLI."""
        f = self.fields
        return {
            "config_hash": self.config_hash,
            "path": None if self.path is None else str(self.path),
            "n_samples": int(self.params.shape[0]),
            "grid": self.config.grid,
            "n_outputs": self.config.grid**2,
            "splits": {name: int(len(self.indices(name))) for name in SPLIT_NAMES},
            "param_names": list(PARAM_NAMES),
            "ranges": {
                name: {"low": lo, "high": hi, "log": name in LOG_PARAMS}
                for name, (lo, hi) in self.config.ranges().items()
            },
            "param_min": dict(zip(PARAM_NAMES, self.params.min(axis=0).tolist(), strict=True)),
            "param_max": dict(zip(PARAM_NAMES, self.params.max(axis=0).tolist(), strict=True)),
            "field_min": float(f.min()),
            "field_max": float(f.max()),
            "field_mean": float(f.mean(dtype=np.float64)),
            "config": self.config.to_dict(),
        }


def cache_path(
    config: ProblemConfig, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE
) -> Path:
    """Where the cache file for ``config`` lives."""
    return Path(cache_dir) / f"{config.config_hash()}.npz"


def _solve_chunk(
    params: npt.NDArray[np.float32], grid: int, source_width: float, source_strength: float
) -> npt.NDArray[np.float32]:
    """Worker: solve a block of parameter rows (module-level so it pickles)."""
    out = np.empty((len(params), grid, grid), dtype=np.float32)
    for i, row in enumerate(params.astype(np.float64)):
        kw = dict(zip(PARAM_NAMES, row.tolist(), strict=True))
        out[i] = solve_field(
            **kw, grid=grid, source_width=source_width, source_strength=source_strength
        )
    return out


class _Progress:
    """rich, else tqdm, else nothing; always on stderr."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self._advance: Callable[[int], None] = lambda k: None
        self._close: Callable[[], None] = lambda: None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            bar = tqdm(total=total, desc=description, file=sys.stderr, unit="field")
            self._advance, self._close = bar.update, bar.close
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        progress.start()
        task = progress.add_task(description, total=total)
        self._advance = lambda k: progress.advance(task, k)
        self._close = progress.stop

    def advance(self, k: int) -> None:
        self._advance(k)

    def close(self) -> None:
        self._close()


def _resolve_workers(workers: int | None) -> int:
    if workers is None:  # the cores this process may use (a cluster job's allocation)
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0)) or 1
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    return workers


def build_fields(
    params: npt.NDArray[np.float32],
    config: ProblemConfig,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> npt.NDArray[np.float32]:
    """Solve every parameter row; in parallel over processes unless ``workers == 1``."""
    n = len(params)
    workers = _resolve_workers(workers)
    args = (config.grid, config.source_width, config.source_strength)
    fields = np.empty((n, config.grid, config.grid), dtype=np.float32)
    bar = _Progress(n, f"solving {n} fields at {config.grid}²", progress)
    try:
        if workers == 1 or n <= 1:
            for i in range(n):
                fields[i : i + 1] = _solve_chunk(params[i : i + 1], *args)
                bar.advance(1)
            return fields
        # ~8 chunks per worker: balances load and gives a smooth progress bar.
        size = max(1, min(64, -(-n // (8 * workers))))
        starts = range(0, n, size)
        # "spawn": safe even if the caller has threads running (e.g. torch), unlike fork.
        # Its cost: workers re-import the caller's __main__, which needs a main guard.
        ctx = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(starts)), mp_context=ctx) as pool:
                futures = {
                    pool.submit(_solve_chunk, params[s : s + size], *args): s for s in starts
                }
                try:
                    for fut in as_completed(futures):
                        s = futures[fut]
                        block = fut.result()
                        fields[s : s + len(block)] = block
                        bar.advance(len(block))
                except BaseException:
                    # a bad row or a Ctrl-C: drop the queued chunks, or leaving the block
                    # would wait for the whole build before the error came out
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "dataset worker processes died. If load_dataset is called from a script, "
                "guard the call with `if __name__ == '__main__':` (workers are spawned and "
                "re-import __main__; code read from stdin cannot be re-imported), "
                "or pass workers=1."
            ) from exc
        return fields
    finally:
        bar.close()


def _read_cache(path: Path, config: ProblemConfig, key: str) -> Dataset | None:
    """The cached dataset, or None (with a warning) if unreadable or mismatched."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAY_KEYS}
            stored_hash = str(z["config_hash"])
    except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc!r}", stacklevel=3)
        return None
    n, g = config.n_samples, config.grid
    ok = (
        stored_hash == key
        and arrays["params"].shape == (n, len(PARAM_NAMES))
        and arrays["fields"].shape == (n, g, g)
        and arrays["params"].dtype == np.float32
        and arrays["fields"].dtype == np.float32
    )
    if ok:  # the inputs and splits are cheap to recompute: a file must agree with them
        splits = split_indices(config)
        ok = (np.array_equal(arrays["params"], sample_params(config).astype(np.float32))
              and all(np.array_equal(arrays[f"{name}_idx"], splits[name]) for name in SPLIT_NAMES)
              # NaN propagates through min/max: no boolean copy of the fields
              and bool(np.isfinite(arrays["fields"].min()) and np.isfinite(arrays["fields"].max())))
    if not ok:
        warnings.warn(f"ignoring dataset cache {path}: does not match config {key}", stacklevel=3)
        return None
    return Dataset(**arrays, config=config, config_hash=key, path=path)


def _physical_memory() -> int | None:
    """Bytes of RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def load_dataset(
    config: ProblemConfig,
    *,
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
    workers: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Load the dataset for ``config`` from cache, building (and caching) it if needed."""
    _resolve_workers(workers)  # fail fast, even on a cache hit
    key = config.config_hash()
    path = cache_path(config, cache_dir)
    if path.is_file():
        cached = _read_cache(path, config, key)
        if cached is not None:
            return cached

    # A dataset that cannot fit is the file's mistake: say so before allocating it.
    need, total = config.n_samples * config.grid**2 * 4, _physical_memory()
    if total and need > total // 2:
        raise UserError(
            f"problem: {config.n_samples} fields at grid {config.grid} need {need / 2**30:.3g} GiB "
            f"(n_samples x grid^2 x 4 bytes), over half of this machine's {total / 2**30:.3g} GiB "
            "of memory; lower problem.grid or problem.n_samples")
    # Check the cache folder is writable *before* minutes of solving, not after.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cache_dir: cannot write the dataset cache in {path.parent}: {os_reason(exc, path)}"
        ) from None
    params = sample_params(config).astype(np.float32)
    column = {name: params[:, i] for i, name in enumerate(PARAM_NAMES)}
    still = np.flatnonzero((column["wind_x"] == 0) & (column["wind_y"] == 0) & (column["decay"] == 0))
    if len(still):  # pure diffusion from a source has no steady state (was a worker traceback)
        raise UserError(f"problem: sample {still[0]} has no wind and no decay (wind_x = wind_y = "
                        f"decay = 0), which has no steady state; raise problem.decay's low "
                        f"above 0 (decay = {config.decay})")
    fields = build_fields(params, config, workers=workers, progress=progress)
    splits = split_indices(config)
    arrays = {
        "params": params,
        "fields": fields,
        **{f"{name}_idx": splits[name] for name in SPLIT_NAMES},
    }
    with atomic_file(path, "wb") as fh:
        np.savez(
            fh,
            **arrays,
            config_hash=np.array(key),
            config_json=np.array(json.dumps(config.to_dict(), sort_keys=True)),
        )
    return Dataset(**arrays, config=config, config_hash=key, path=path)
