"""Worker scaling and storage overhead: trials/hour for 1 vs K workers; storage ms per trial.

1. Throughput: studies/smoke.toml (grid 16, 80 samples, width 16) at 1000 steps per trial, run to N COMPLETE
   trials by `dmdopt study run --workers K --no-mlflow` on a fresh SQLite storage, for each K.
   trials/hour counts the trial phase only (first trial start -> last trial end, from the
   storage's own timestamps); the wall column also holds start-up, dataset and reference run.
2. Storage overhead: what the Optuna storage costs one trial of a quick.toml-like study, with a
   no-op objective, as the engine does it (heartbeats on, NSGA-II): the worker
   loop's bookkeeping (trial counts, stale-trial check), ask, 4 suggests, 18 user attributes
   (one a 30-point curve), tell. (Multi-objective trials report no intermediate values.)
   Median over M trials, against SQLite and, when $DMDOPT_TEST_POSTGRES_URL is set, PostgreSQL.

    python benchmarks/bench_workers.py [--trials 8] [--steps 1000] [--workers 1,2] [--threads T]
                                       [--overhead-trials 20] [--skip-throughput] [--skip-overhead]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

SMOKE = Path(__file__).resolve().parents[1] / "studies" / "smoke.toml"


def smoke_study(name: str, steps: int) -> str:
    """studies/smoke.toml under another name, with `steps` training steps per trial."""
    text = SMOKE.read_text()
    for old, new in (('name = "smoke"', f'name = "{name}"'), ("max_steps = 250", f"max_steps = {steps}")):
        assert old in text, f"{SMOKE} no longer has {old!r}"
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- 1. throughput
def throughput(workers: list[int], n_trials: int, steps: int, tmp: Path,
               threads: int | None) -> list[dict]:
    import optuna
    from optuna.trial import TrialState

    from dmdopt.problem import ProblemConfig, load_dataset
    from dmdopt.search.storage import open_storage

    cache = tmp / "data"
    load_dataset(ProblemConfig(grid=16, n_samples=80), cache_dir=cache, progress=False)  # shared
    rows = []
    for k in workers:
        name = f"bench-w{k}-{uuid.uuid4().hex[:6]}"
        study_file = tmp / f"{name}.toml"
        study_file.write_text(smoke_study(name, steps))
        url = f"sqlite:///{tmp / (name + '.db')}"
        cmd = [sys.executable, "-m", "dmdopt", "study", "run", str(study_file), "--storage", url,
               "--workers", str(k), "--n-trials", str(n_trials), "--no-mlflow", "--quiet",
               "--cache-dir", str(cache)]
        print(f"  {k} worker(s): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        env = dict(os.environ)
        if threads is not None:  # else the engine's policy: 1 worker = torch's default,
            env["OMP_NUM_THREADS"] = str(threads)  # K CPU workers = cores // K threads each
        subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        first = min(t.datetime_start for t in trials if t.datetime_start)
        last = max(t.datetime_complete for t in trials if t.datetime_complete)
        phase = (last - first).total_seconds()
        per_trial = statistics.mean((t.datetime_complete - t.datetime_start).total_seconds()
                                    for t in done)
        rows.append({"workers": k, "complete": len(done), "all": len(trials), "wall": wall,
                     "phase": phase, "per_hour": len(done) / phase * 3600, "trial_s": per_trial})
    return rows


# ---------------------------------------------------------------- 2. storage overhead
PHASES = ("bookkeeping", "ask", "suggest", "user_attrs", "tell")


def storage_overhead(url: str, n: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per phase of one no-op trial (and their per-trial total)."""
    import optuna
    from optuna.trial import TrialState

    from dmdopt.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # ask/tell on a heartbeat storage warns that heartbeats need optimize(): we time the
    # storage operations, not the heartbeat thread (one UPDATE per interval per trial).
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    storage = open_storage(url)
    name = f"bench-overhead-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["minimize", "minimize"],
        sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4))
    curve = [[float(c), 0.5 * 0.97 ** c] for c in range(30)]
    samples: dict[str, list[float]] = {p: [] for p in PHASES + ("total",)}
    try:
        for i in range(warmup + n):
            t = {}
            t0 = time.perf_counter()
            for states in ((TrialState.COMPLETE,), (TrialState.RUNNING,), (TrialState.WAITING,)):
                study.get_trials(deepcopy=False, states=states)  # the worker loop's counts
            optuna.storages.fail_stale_trials(study)  # what optimize() does before ask
            t["bookkeeping"] = time.perf_counter()
            trial = study.ask()
            t["ask"] = time.perf_counter()
            window = trial.suggest_int("window", 5, 40)
            trial.suggest_int("rank", 1, 12)
            trial.suggest_float("horizon", 10.0, 2000.0, log=True)
            trial.suggest_categorical("horizon_inf", [False, True])
            t["suggest"] = time.perf_counter()
            attrs = {"worker": "bench:0", "rank_effective": 3, "training": {"lr": 3e-3},
                     "dmd": {"window": window}, "cost_total": 600.0, "cost_to_reference": 400.0,
                     "reached_reference": True, "val_error": 0.07, "test_error": 0.071,
                     "val_r2": 0.9, "wall_time": 3.0, "wall_to_reference": 2.0, "dmd_time": 0.1,
                     "speedup": 1.5, "jumps_accepted": 5, "jumps_rejected": 2, "curve": curve}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            t["user_attrs"] = time.perf_counter()
            study.tell(trial, [400.0 + i, 0.07 + 1e-3 * (i % 7)])
            t["tell"] = time.perf_counter()
            if i >= warmup:
                prev = t0
                for phase in PHASES:
                    samples[phase].append((t[phase] - prev) * 1000)
                    prev = t[phase]
                samples["total"].append((t["tell"] - t0) * 1000)
    finally:
        optuna.delete_study(study_name=name, storage=storage)
    return {phase: statistics.median(values) for phase, values in samples.items()}


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="N COMPLETE trials per run")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per trial")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every worker "
                        "(default: the engine's policy)")
    parser.add_argument("--overhead-trials", type=int, default=20)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from dmdopt.search import storage as _storage  # noqa: F401 - also quiets optuna warnings

    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="dmdopt-bench-workers-") as tmp_dir:
        tmp = Path(tmp_dir)
        if not args.skip_throughput:
            rows = throughput(workers, args.trials, args.steps, tmp, args.threads)
            base = rows[0]["per_hour"]
            policy = f"OMP_NUM_THREADS={args.threads}" if args.threads else "default threads"
            print(f"\nThroughput: smoke study ({args.steps} steps/trial), N = {args.trials} "
                  "COMPLETE trials, SQLite, "
                  f"--no-mlflow, {policy}")
            print(f"{'workers':>7} {'trials':>9} {'wall s':>7} {'trial phase s':>13} "
                  f"{'mean trial s':>12} {'trials/hour':>11} {'vs 1':>5}")
            for r in rows:
                print(f"{r['workers']:>7} {r['complete']:>4}/{r['all']:<4} {r['wall']:>7.1f} "
                      f"{r['phase']:>13.1f} {r['trial_s']:>12.1f} {r['per_hour']:>11.0f} "
                      f"{r['per_hour'] / base:>4.2f}x")
            print("(trials = COMPLETE/all; the extra ones are surplus trials pruned at start)")
        if not args.skip_overhead:
            backends = [("SQLite", f"sqlite:///{tmp / 'overhead.db'}")]
            pg = os.environ.get("DMDOPT_TEST_POSTGRES_URL")
            if pg:
                backends.append(("PostgreSQL", pg))
            results = [(label, storage_overhead(url, args.overhead_trials)) for label, url in backends]
            print(f"\nStorage overhead per trial: median ms over {args.overhead_trials} no-op trials"
                  " (heartbeats on, NSGA-II)")
            print(f"{'storage':<11}" + "".join(f"{p:>13}" for p in PHASES) + f"{'total':>9}")
            for label, med in results:
                print(f"{label:<11}" + "".join(f"{med[p]:>13.1f}" for p in PHASES)
                      + f"{med['total']:>9.1f}")
            if not pg:
                print("(PostgreSQL skipped: DMDOPT_TEST_POSTGRES_URL is not set)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (other jobs share these cores)")


if __name__ == "__main__":
    main()
