"""Benchmark: plain training vs the same optimiser + DMD jumps, side by side.

For each base optimiser (Adam; SGD without momentum, i.e. GD since the benchmark trains full
batch; SGD with momentum 0.9) and each seed: a plain run at the budget, then a run with the
default `DMDConfig` at the same budget and the same learning rate. The DMD run's *cost to
target* is the backprop-equivalent cost (`dmdopt.training.cost`) at which its validation error
first reaches the plain run's final validation error; speedup = plain cost / cost to target.
Validation curves at the tuned learning rates are not monotone, so the plain curve may itself
touch its final error before the budget ends; that *first passage* is reported beside it, and
`first_passage_speedup` = plain first passage / DMD cost to target is the stricter ratio (the
issue's ratio uses the plain run's whole budget).

Learning rates are the plain optimiser's, tuned first on the benchmark problem (the best final
validation error on a small grid; see `LEARNING_RATES`), so the reference is not handicapped;
the DMD run reuses them unchanged.

Problem and model: `ProblemConfig()` (64^2 fields, 2048 samples) with `ModelConfig()`
(tanh MLP 128 x 3), or with ``quick=True`` 32^2 / 512 samples and a 64 x 2 MLP. Full batch.
The learning curve is evaluated every `EVAL_EVERY` steps (monitoring, not counted as cost), so
costs to target are resolved to that many steps.

DMD share of wall time = accelerator time (snapshots + POD/DMD linear algebra + forming the
candidate weights) / the DMD run's training wall time. Forward-only closure evaluations (the
accept/reject and line-search losses) are counted in the bpe cost and reported separately
(`fwd_share`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from dmdopt._util import DEFAULT_CACHE, atomic_file, os_reason, sigterm_as_interrupt, unwritable

METHODS = ("adam", "gd", "sgd_momentum")
"""Benchmark method names: Adam; SGD without momentum (GD); SGD with momentum 0.9."""

LEARNING_RATES = {
    # method: (full problem lr, quick problem lr) -- the plain optimiser's best on a small grid
    # tuned on the quick problem over {1e-3, 3e-3, 1e-2, 3e-2} / {0.03 .. 20} / {0.1 .. 3}.
    # On the default problem at its 2,000-step budget (median final validation error over
    # seeds 0-2, 2026-11-28): Adam 3e-3 (0.0637) beat 1e-3 (0.0666) and 1e-2 (0.0794, which
    # spikes); GD 8 beat 4; SGD+momentum 1 (0.1107) beat 2 (0.1123).
    "adam": (3e-3, 1e-2),
    "gd": (8.0, 8.0),
    "sgd_momentum": (1.0, 2.0),
}
QUICK_STEPS = 600
"""The quick problem's budget. The default problem runs at `TrainConfig`'s default budget
(2,000 steps), the budget the issue's ratios are defined at; `--steps 400` is a faster look."""
EVAL_EVERY = 10


def _configs(method: str, *, lr: float, steps: int, seed: int):
    from dmdopt.training.config import TrainConfig

    optimizer = "adam" if method == "adam" else "sgd"
    momentum = 0.9 if method == "sgd_momentum" else 0.0
    return TrainConfig(optimizer=optimizer, lr=lr, momentum=momentum, max_steps=steps,
                       eval_every=EVAL_EVERY, seed=seed, device="auto")


def _problem(quick: bool):
    from dmdopt.model import ModelConfig
    from dmdopt.problem import ProblemConfig

    if quick:
        return ProblemConfig(grid=32, n_samples=512), ModelConfig(width=64, depth=2)
    return ProblemConfig(), ModelConfig()


@functools.lru_cache(maxsize=2)
def _dataset(quick: bool, cache_dir: str):
    """The benchmark problem's dataset, built or read from the cache once per process."""
    from dmdopt.problem import load_dataset

    return load_dataset(_problem(quick)[0], cache_dir=cache_dir, progress=False)


def _budget(steps: int | None, quick: bool) -> int:
    """The steps each run trains: `steps`, else the problem's default budget."""
    from dmdopt.training.config import TrainConfig

    return steps or (QUICK_STEPS if quick else TrainConfig().max_steps)


def _median(values, missing: float | None = None):
    """Median over the seeds. `missing` stands in for a seed without a value (a DMD run that
    never reached the target: cost inf, speed-up 0), so a miss moves the median instead of
    dropping out of it; None leaves such seeds out (a share nobody measured)."""
    values = [missing if v is None else v for v in values]
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    if missing is None or len(values) % 2 or missing not in values:
        return statistics.median(values)  # no miss among them: the same median as plain's
    # an even count with misses: the worse middle value, never the mean of a hit and a miss
    return statistics.median_high(values) if missing > 0 else statistics.median_low(values)


def _fmt(value, spec: str = ".4g") -> str:
    """'-' for no value, and for a cost median that is a miss (inf) or a speed-up of 0."""
    return "-" if value is None or math.isinf(value) else format(value, spec)


def _finite_or_none(value):
    """Rows as strict JSON: a non-finite number (a diverged run's error) becomes null."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_benchmark(*, seeds: int = 3, steps: int | None = None, json_path=None,
                  quick: bool = False, echo: Callable[[str], None] = print,
                  methods: tuple[str, ...] = METHODS, dmd=None, lrs: dict | None = None,
                  jobs: int = 1, threads: int | None = None,
                  cache_dir: str = DEFAULT_CACHE) -> list[dict]:
    """Run plain vs DMD for each method and seed; print a table; return (and write) rows.

    Each row: method, seed, variant ('plain' | 'dmd'), final_val_error, cost (bpe spent),
    wall_time; plain rows also first_passage_cost/_wall (where the plain curve itself first
    reaches its final error); DMD rows cost_to_target, wall_to_target, speedup (plain cost /
    cost_to_target; None if the plain error was never reached), first_passage_speedup (plain
    first passage / cost_to_target), dmd_share (the DMD maths' share of the run's wall time),
    accelerator_share (the same with the closure's accept/reject forward passes), fwd_share
    (those forward passes' share of the bpe cost), jumps_accepted, jumps_rejected.

    `lrs` overrides `LEARNING_RATES` per method. `jobs` > 1 runs the (method, seed) pairs in
    that many processes, the CPU threads split between them; a pair's plain and DMD runs stay
    in one process, so its ratios compare like with like (wall times are those of a shared
    machine). `threads` per process (jobs > 1 only) defaults to the cores split between them.
    """
    from dmdopt.training.config import DMDConfig

    steps = _budget(steps, quick)
    dmd = dmd or DMDConfig()
    lrs = {m: (lrs or {}).get(m, LEARNING_RATES[m][1 if quick else 0]) for m in methods}
    problem, model = _problem(quick)
    _dataset(quick, cache_dir)  # built once, before any worker reads it from the cache
    jobs = min(jobs, len(methods) * seeds)  # a process per (method, seed) pair at most
    echo(f"dmdopt bench: {'quick' if quick else 'default'} problem (grid {problem.grid}, "
         f"{problem.n_samples} samples), MLP {model.width}x{model.depth}, full batch, "
         f"{steps} steps, {seeds} seed(s){f', {jobs} jobs' if jobs > 1 else ''}")
    echo(f"DMD: {dmd.to_dict()}")
    pairs = [dict(method=m, seed=seed, lr=lrs[m], quick=quick, steps=steps, dmd=dmd.to_dict(),
                  cache_dir=cache_dir) for m in methods for seed in range(seeds)]
    rows: list[dict] = []
    failure: BaseException | None = None  # a pair that failed: the finished ones are kept
    if jobs <= 1:
        for pair in pairs:
            try:
                pair_rows, line = _run_pair(**pair)
            except Exception as exc:  # noqa: BLE001 - reported after the table, below
                failure = exc
                break
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the finished pairs are kept
                failure = exc
                break
            rows.extend(pair_rows)
            echo(line)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp
        import os

        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=_set_threads, initargs=(threads,)) as pool:
            futures = [pool.submit(_run_pair, **pair) for pair in pairs]
            try:
                for future in cf.as_completed(futures):
                    try:
                        pair_rows, line = future.result()
                    except Exception as exc:  # noqa: BLE001 - a dead worker, or a bug
                        failure = exc
                        break
                    rows.extend(pair_rows)
                    echo(line)
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: stop the pairs running too,
                _stop(pool)                      # then print and write the finished ones
                failure = exc
            except BaseException:
                _stop(pool)
                raise
            if failure is not None:
                _stop(pool)
        order = {m: i for i, m in enumerate(methods)}
        rows.sort(key=lambda r: (order[r["method"].removesuffix("+dmd")], r["seed"],
                                 r["variant"] != "plain"))
    _table(rows, methods, echo)
    if json_path is not None and (rows or not isinstance(failure, KeyboardInterrupt)):
        path = Path(json_path)
        try:
            with atomic_file(path) as fh:
                fh.write(json.dumps(_finite_or_none(rows), indent=2, allow_nan=False))
        except OSError as exc:  # checked before the run (`unwritable`); the disk may fill since
            from dmdopt.errors import UserError
            raise UserError(f"--json: cannot write {path}: {os_reason(exc, path)}") from None
        echo(f"wrote {path}{' (the pairs that finished)' if failure is not None else ''}")
    if isinstance(failure, KeyboardInterrupt):
        raise failure  # exit 130, after what finished is printed and written
    if failure is not None:
        import concurrent.futures.process as cfp

        if isinstance(failure, cfp.BrokenProcessPool):  # killed (the OS's OOM killer, kill -9)
            from dmdopt.errors import WorkersFailed
            finished = sum(r["variant"] == "plain" for r in rows)
            raise WorkersFailed(f"a --jobs worker process died ({finished} of {len(pairs)} "
                            "(method, seed) pairs finished, shown above): killed by the OS, "
                            "out of memory? Try fewer --jobs") from None
        raise failure  # a bug: its traceback, after what finished is printed and written
    return rows


def _is_tuned_config(path: Path) -> bool:
    """An existing JSON tuned config (a table with `schema_version`), not a bench's rows."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "schema_version" in data


def _stop(pool) -> None:
    """Stop a pool's running pairs now. The executor has no public terminate before Python
    3.14, and a pair left running trains on for minutes after its launcher is gone."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_pair(*, method: str, seed: int, lr: float, quick: bool, steps: int, dmd: dict,
              cache_dir: str) -> tuple[list[dict], str]:
    """One method and seed: the plain run, then the DMD run at the same lr; (rows, a line)."""
    from dmdopt.training.config import DMDConfig
    from dmdopt.training.loop import Diverged, train

    model = _problem(quick)[1]
    dataset = _dataset(quick, cache_dir)
    training = _configs(method, lr=lr, steps=steps, seed=seed)
    # A few untimed steps first: torch's one-time start-up (thread pool, allocator) would
    # otherwise be billed to the plain run's wall time, which always goes first.
    with contextlib.suppress(Diverged):  # a divergence is the plain run's to report, below
        train(dataset=dataset, model=model, training=replace(training, max_steps=3, eval_every=3))
    try:
        plain = train(dataset=dataset, model=model, training=training)
    except Diverged as exc:  # a row all the same: the table and the JSON show the divergence
        return [{"method": method, "variant": "plain", "seed": seed, "lr": training.lr,
                 "final_val_error": None, "cost": None, "wall_time": None,
                 "cost_to_target": None, "wall_to_target": None, "speedup": None,
                 "first_passage_cost": None, "first_passage_wall": None, "error": str(exc)}], \
            f"{method} seed {seed}: plain run diverged ({exc}); no target for its DMD run"
    target = plain.val_error
    # The plain curve is not monotone (Adam and GD at their tuned rates oscillate), so it may
    # first reach its own final error before the budget ends: its first passage is the
    # stricter reference for the DMD run's first passage.
    first = plain.cost_to_reach(target)
    rows = [{"method": method, "variant": "plain", "seed": seed, "lr": training.lr,
             "final_val_error": target, "cost": plain.backprop_equivalent,
             "wall_time": plain.wall_time, "cost_to_target": plain.backprop_equivalent,
             "wall_to_target": plain.wall_time, "speedup": 1.0,
             "first_passage_cost": first[0], "first_passage_wall": first[1]}]
    row = {"method": f"{method}+dmd", "variant": "dmd", "seed": seed, "lr": training.lr}
    rows.append(row)
    try:
        result = train(dataset=dataset, model=model, training=training,
                       dmd=DMDConfig.from_dict(dmd))
    except Diverged as exc:
        # every key a finished DMD row has, so that the JSON rows share one layout
        row.update(final_val_error=math.inf, cost=None, wall_time=None, cost_to_target=None,
                   wall_to_target=None, speedup=None, first_passage_speedup=None,
                   wall_speedup=None, dmd_share=None, accelerator_share=None, fwd_share=None,
                   jumps_accepted=None, jumps_rejected=None, error=str(exc))
        return rows, f"{method} seed {seed}: DMD run diverged ({exc})"
    reached = result.cost_to_reach(target)
    row.update(
        final_val_error=result.val_error, cost=result.backprop_equivalent,
        wall_time=result.wall_time,
        cost_to_target=reached[0] if reached else None,
        wall_to_target=reached[1] if reached else None,
        speedup=(plain.backprop_equivalent / reached[0]) if reached and reached[0] > 0 else None,
        first_passage_speedup=(first[0] / reached[0]) if reached and reached[0] > 0 else None,
        wall_speedup=(plain.wall_time / reached[1]) if reached and reached[1] > 0 else None,
        dmd_share=result.dmd_time / result.wall_time if result.wall_time > 0 else None,
        accelerator_share=((result.dmd_time + result.forward_time) / result.wall_time
                           if result.wall_time > 0 else None),
        fwd_share=(result.cost["forward_passes"] / 3.0) / result.backprop_equivalent,
        jumps_accepted=result.jumps_accepted, jumps_rejected=result.jumps_rejected,
    )
    return rows, (f"{method:13s} seed {seed}: plain {target:.4f} @ {plain.backprop_equivalent:.0f} bpe"
                  f" | dmd {result.val_error:.4f}, target at {_fmt(row['cost_to_target'], '.0f')} bpe"
                  f" (x{_fmt(row['speedup'], '.2f')}), jumps {result.jumps_accepted}/"
                  f"{result.jumps_accepted + result.jumps_rejected}, dmd share "
                  f"{row['dmd_share']:.1%} ({row['accelerator_share']:.1%} with its forwards)")


def _table(rows: list[dict], methods, echo) -> None:
    """Medians over each method's seeds. A DMD run that never reached the target counts as an
    infinite cost and a speed-up of 0 (so a row whose median seed missed shows '-'); a plain
    run that diverged has no target, so its seed has no DMD run and is named below the table."""
    head = (f"{'method':13s} {'lr':>7s} | {'plain err':>9s} {'plain bpe':>9s} {'plain s':>7s} | "
            f"{'dmd err':>8s} {'bpe->tgt':>8s} {'s->tgt':>7s} {'reached':>7s} | "
            f"{'cost x':>6s} {'fp x':>5s} {'wall x':>6s} {'dmd%':>5s} {'acc%':>5s} {'fwd%':>5s}")
    echo("")
    echo("medians over seeds; cost x = plain bpe / DMD bpe to reach the plain final error, "
         "fp x = plain's own first passage to that error / DMD's (higher is better); "
         "dmd% = the DMD maths' share of the DMD run's wall time, acc% = with the accept/reject "
         "forward passes, fwd% = those passes' share of its bpe cost")
    echo(head)
    echo("-" * len(head))
    notes = []
    for method in methods:
        every = [r for r in rows if r["method"] == method]
        plain = [r for r in every if r.get("error") is None]
        dmd = [r for r in rows if r["method"] == f"{method}+dmd"]
        if diverged := [r["seed"] for r in every if r.get("error") is not None]:
            notes.append(f"{method}: the plain run diverged at seed(s) "
                         f"{', '.join(map(str, diverged))} (no target, no DMD run there)")
        if not every:
            continue
        if not plain:
            echo(f"{method:13s} {every[0]['lr']:>7.3g} | plain run diverged at every seed")
            continue
        reached = [r for r in dmd if r.get("cost_to_target") is not None]
        share = _median([r.get("dmd_share") for r in dmd])
        acc = _median([r.get("accelerator_share") for r in dmd])
        fwd = _median([r.get("fwd_share") for r in dmd])
        echo(f"{method:13s} {plain[0]['lr']:>7.3g} | "
             f"{_fmt(_median([r['final_val_error'] for r in plain]), '9.4f')} "
             f"{_fmt(_median([r['cost'] for r in plain]), '9.0f')} "
             f"{_fmt(_median([r['wall_time'] for r in plain]), '7.1f')} | "
             f"{_fmt(_median([r['final_val_error'] for r in dmd], math.inf), '8.4f')} "
             f"{_fmt(_median([r['cost_to_target'] for r in dmd], math.inf), '8.0f')} "
             f"{_fmt(_median([r['wall_to_target'] for r in dmd], math.inf), '7.1f')} "
             f"{f'{len(reached)}/{len(dmd)}':>7s} | "
             f"{_fmt(_median([r.get('speedup') for r in dmd], 0.0) or None, '6.2f')} "
             f"{_fmt(_median([r.get('first_passage_speedup') for r in dmd], 0.0) or None, '5.2f')} "
             f"{_fmt(_median([r.get('wall_speedup') for r in dmd], 0.0) or None, '6.2f')} "
             f"{_fmt(100 * share if share is not None else None, '5.1f')} "
             f"{_fmt(100 * acc if acc is not None else None, '5.1f')} "
             f"{_fmt(100 * fwd if fwd is not None else None, '5.1f')}")
    echo("")
    for note in notes:
        echo(note)


def add_arguments(parser) -> None:
    """The benchmark's options, shared by `dmdopt bench` and `benchmarks/bench_dmd.py`."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="the budget (default: TrainConfig's 2000; 600 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small problem of studies/quick.toml")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the (method, seed) pairs in this many processes (CPU threads "
                             "split between them)")
    parser.add_argument("--methods", default=",".join(METHODS), help="e.g. gd or adam,gd")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="override a method's learning rate, e.g. --lr gd=1")
    parser.add_argument("--dmd", default="", metavar="KEY=VALUE,...",
                        help="DMDConfig fields instead of the defaults, e.g. window=10,rank=8; "
                             "a ladder as line_search=0.25:1:4")


def run_from_args(args, error: Callable[[str], NoReturn]) -> list[dict]:
    """Run the benchmark from parsed `add_arguments` options; `error(msg)` reports bad input
    (argparse's `parser.error`: one line, exit 2). SIGTERM raises `KeyboardInterrupt` here,
    like Ctrl-C, after the --jobs workers are stopped."""
    from dmdopt.training.config import DMDConfig

    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            error(f"{flag} must be a positive integer, got {value}")
    methods = tuple(m for m in args.methods.split(",") if m)
    if not methods:
        error(f"--methods: no method given in {args.methods!r} (known: {', '.join(METHODS)})")
    for method in methods:
        if method not in METHODS:
            error(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")
        if methods.count(method) > 1:  # it would run twice and print two rows of one name
            error(f"--methods: {method!r} is given twice in {args.methods!r}")
    lrs = {}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in METHODS:
            error(f"--lr: unknown method {method!r}")
        if method not in methods:  # it would be silently ignored
            error(f"--lr: {method!r} is not among --methods {','.join(methods)}")
        if method in lrs:  # the last would silently win
            error(f"--lr: {method!r} is given twice")
        try:
            lrs[method] = float(value)
        except ValueError:
            error(f"--lr: {method}={value!r} is not a number")
        if not (math.isfinite(lrs[method]) and lrs[method] > 0):
            error(f"--lr: {method}={value!r} must be a positive number")
    dmd = None
    if args.dmd:
        fields = {}
        for item in filter(None, (part.strip() for part in args.dmd.split(","))):  # "a=1,"
            key, _, value = item.partition("=")
            if key in fields:  # the last would silently win
                error(f"--dmd: {key!r} is given twice in {args.dmd!r}")
            if key == "line_search":  # a ladder: factors joined by ':' (',' separates fields)
                try:
                    fields[key] = tuple(float(f) for f in value.split(":") if f)
                except ValueError:
                    error(f"--dmd: line_search={value!r}: factors are numbers joined by ':', "
                          "e.g. line_search=0.25:1:4")
                continue
            for kind in (int, float):  # numbers as numbers; words (inf, drift, global) as text
                try:
                    fields[key] = value if value == "inf" else kind(value)
                    break
                except ValueError:
                    fields[key] = value
        try:
            dmd = DMDConfig.from_dict(fields)
        except (TypeError, ValueError) as exc:
            error(f"--dmd: {exc}")
    steps = _budget(args.steps, args.quick)
    first = (dmd or DMDConfig()).first_jump_step
    if steps < first:  # the window never fills: the "DMD" runs would be plain ones
        budget = f"--steps {steps}" if args.steps else f"the budget of {steps} steps (--steps)"
        error(f"{budget} is fewer than the DMD window ({first} steps before the first jump): "
              "DMD would never run")
    if args.json is not None and not args.json:
        error("--json: give a file path, got an empty string")
    if args.json and not args.json.endswith("/") and not Path(args.json).is_dir():
        # a study file or tuned config given by mistake was overwritten with the rows (a
        # folder: `unwritable` says so below)
        if Path(args.json).suffix.lower() != ".json":
            error(f"--json: expected a path ending in .json, got {args.json}")
        if _is_tuned_config(Path(args.json)):
            error(f"--json: {args.json} is a tuned config (from `dmdopt export`); write the rows "
                  "to another path")
    if args.json is not None and (why := unwritable(args.json)) is not None:
        error(f"--json: cannot write {args.json}: {why}")  # now, not after the whole run
    t0 = time.perf_counter()
    with sigterm_as_interrupt():  # `kill`, a scheduler's stop: the --jobs workers stop too
        rows = run_benchmark(seeds=args.seeds, steps=args.steps, json_path=args.json,
                             quick=args.quick, methods=methods, dmd=dmd, lrs=lrs, jobs=args.jobs)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rows


def main(argv=None) -> None:  # pragma: no cover - thin wrapper for benchmarks/bench_dmd.py
    import sys

    from dmdopt.cli import _Parser  # a usage error is one line, as in `dmdopt bench`
    from dmdopt.errors import UserError, WorkersFailed

    parser = _Parser(description="plain vs DMD-accelerated training")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_from_args(args, parser.error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as exc:  # as `dmdopt bench` reports it: one line, exit 2
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except WorkersFailed as exc:  # not the user's mistake: one line, exit 1
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
