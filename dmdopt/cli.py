"""The `dmdopt` command: parse arguments, call the library, print. Nothing else lives here.

A user's mistake (bad flag, bad file, unknown study, unreachable storage) prints ONE line on
stderr and exits with code 2; Ctrl-C exits 130 and keeps every finished trial.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from pathlib import Path

from dmdopt import bench
from dmdopt._util import DEFAULT_CACHE, DEFAULT_STORAGE
from dmdopt.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _nonempty(what: str):
    """An argparse type refusing "" (which would otherwise mean "not given" or a default)."""
    def check(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty string")
        return text
    return check


_url = _nonempty("a storage URL")
_tracking_uri = _nonempty("an MLflow tracking URI")
_path = _nonempty("a path")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _workers(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _load_study(args):
    """(name, storage, study) of the study the command names: directly, or by its TOML file,
    which also gives its storage. Named by a file that no longer matches the stored study
    (edited since it ran), the stored study is what is read: say so, as `study run` would
    refuse the file."""
    from dmdopt.search.storage import load_study

    config = None
    if args.name.lower().endswith(".toml"):
        from dmdopt.search.config import load_study_file

        config = load_study_file(args.name)
    name = config.name if config else args.name
    storage = args.storage or (config.storage if config else DEFAULT_STORAGE)
    study = load_study(name, storage)
    if config is not None and (stored := study.user_attrs.get("config")):
        from dmdopt.search.study import config_differences

        if changed := config_differences(stored, config):
            print(f"warning: {args.name} differs from the stored study {name!r} ({changed}); "
                  "this reads the stored study", file=sys.stderr)
    return name, storage, study


def _output_is_not_the_study_file(args) -> None:
    """`export studies/x.toml -o studies/x.toml` would replace the study's definition, and so
    would `export quick -o quick.toml` (the study named by name, its file beside): an existing
    study file (a TOML file with a [study] table) is never overwritten."""
    import tomllib

    out, name = Path(args.output), Path(args.name)
    if args.name.lower().endswith(".toml") and out.exists() and name.exists() and out.samefile(name):
        raise UserError(f"--output {args.output} is the study file itself; write the output "
                        "to another path")
    if out.suffix.lower() == ".toml" and out.is_file():  # (export reads .TOML as TOML too)
        try:
            text = out.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError):
            text = ""
        try:
            is_study = isinstance(tomllib.loads(text).get("study"), dict)
        except tomllib.TOMLDecodeError:  # a study file mid-edit is still one: its header says
            is_study = re.search(r"^\s*\[\s*study\s*\]", text, re.MULTILINE) is not None
        if is_study:
            raise UserError(f"--output {args.output} is a study file (it has a [study] table); "
                            "write the output to another path")


def _summary(args, **kwargs) -> tuple[str, str, dict]:
    """(name, storage, plain-data summary) of the study the command names."""
    from dmdopt.search.summary import summarize

    name, storage, study = _load_study(args)
    return name, storage, summarize(study, storage_url=storage, **kwargs)


# ---------------------------------------------------------------------------------------------
def cmd_data(args) -> int:
    from dmdopt.problem import ProblemConfig, load_dataset

    overrides = {k: v for k, v in (("grid", args.grid), ("n_samples", args.samples),
                                   ("seed", args.seed)) if v is not None}
    try:
        config = ProblemConfig(**overrides)
    except (TypeError, ValueError) as exc:
        raise UserError(f"data: {exc}") from None
    dataset = load_dataset(config, cache_dir=args.cache_dir, workers=args.workers,
                           progress=not args.quiet)
    info = dataset.describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


_PLAIN_TRAIN_FLAGS = ("optimizer", "lr", "momentum", "batch_size", "accept_rows", "eval_every", "seed", "width",
                      "depth", "activation", "grid", "samples", "dmd_window", "dmd_rank",
                      "dmd_horizon")
_CONFIG_TRAIN_FLAGS = ("checkpoint_dir", "tracking_uri")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checkpoint_kept(config_path: str, checkpoints) -> str:
    """What an interrupted production run leaves to resume from, in words."""
    try:
        from dmdopt.export import load_tuned_config
        from dmdopt.production import _checkpoint_step

        ckpt = Path(checkpoints) / f"{load_tuned_config(config_path).settings_hash()}.pt"
        step = _checkpoint_step(ckpt) if ckpt.is_file() else None
    except Exception:  # noqa: BLE001 - the interrupt is the news; this is only a hint
        return "run the same command again to resume from the last checkpoint, if any"
    if step is None:
        return "no checkpoint was written yet; the same command starts over"
    return f"the checkpoint at step {step} ({ckpt}) is kept; run the same command again to resume"


def cmd_train(args) -> int:
    given = [n for n in _PLAIN_TRAIN_FLAGS if getattr(args, n) is not None]
    if args.config and given:
        raise UserError(f"train: {_flag(given[0])} does not apply with --config (the tuned config "
                        "fixes it; only --steps and --device override it)")
    unused = [n for n in _CONFIG_TRAIN_FLAGS if getattr(args, n) is not None]
    if not args.config and unused:  # (--no-mlflow is harmless there: a plain run logs nothing)
        raise UserError(f"train: {_flag(unused[0])} applies only with --config (a plain run "
                        "keeps no checkpoint and logs nothing)")
    if args.config:
        from dmdopt._util import sigterm_as_interrupt
        from dmdopt.production import DEFAULT_CHECKPOINT_DIR, run_production

        checkpoints = args.checkpoint_dir or DEFAULT_CHECKPOINT_DIR
        try:
            with sigterm_as_interrupt():  # a scheduler's stop is a Ctrl-C: exit 130
                out = run_production(args.config, steps=args.steps, device=args.device,
                                     checkpoint_dir=checkpoints, tracking_uri=args.tracking_uri,
                                     cache_dir=args.cache_dir, progress=not args.quiet,
                                     log_mlflow=not args.no_mlflow)
        except KeyboardInterrupt:
            print(f"interrupted: {_checkpoint_kept(args.config, checkpoints)}", file=sys.stderr)
            return 130
        error = out.pop("mlflow_error", None)
        already = out.pop("already_logged", False)
        _print_metrics(out)  # the results first, whatever happens to the logging
        if already:
            print(f"note: this checkpoint's result is already logged as MLflow run "
                  f"{out['run_id']}; nothing new was trained or logged", file=sys.stderr)
        if out["stopped_by"] == "target":  # e.g. a config exported from a cost_to_target study
            print(f"note: the run stopped at step {out['steps']}, where it reached "
                  f"training.target_error; delete that key from {args.config} to train the "
                  "whole budget (--steps alone does not)", file=sys.stderr)
        if error is not None:
            print(f"dmdopt: error: {error}", file=sys.stderr)
            return 1
        return 0
    from dmdopt.model import ModelConfig
    from dmdopt.problem import ProblemConfig, load_dataset
    from dmdopt.training import DMDConfig, TrainConfig, train
    from dmdopt.training.loop import resolve_device

    try:
        problem = ProblemConfig(**({"grid": args.grid} if args.grid else {}),
                                **({"n_samples": args.samples} if args.samples else {}))
        chosen = lambda *names: {n: getattr(args, n) for n in names if getattr(args, n) is not None}  # noqa: E731
        training = TrainConfig(**chosen("optimizer", "lr", "momentum", "batch_size",
                                        "accept_rows", "seed", "eval_every"),
                               max_steps=args.steps or TrainConfig().max_steps,
                               device=args.device or "auto")
        model = ModelConfig(**chosen("width", "depth", "activation"))
        dmd = None
        if any(getattr(args, n) is not None for n in ("dmd_window", "dmd_rank", "dmd_horizon")):
            # a flag left out takes DMDConfig's default, as in Python and in a study's [dmd]
            given = {k.removeprefix("dmd_"): v for k, v in chosen("dmd_window", "dmd_horizon").items()}
            if args.dmd_rank is not None:
                given["rank"] = _number(args.dmd_rank)
            dmd = DMDConfig(**given)
            if dmd.first_jump_step > training.max_steps:  # the window never fills: DMD silently off
                window = (f"--dmd-window {dmd.window}" if args.dmd_window is not None
                          else f"the DMD window ({dmd.window}, the default)")
                raise ValueError(f"{window} exceeds --steps {training.max_steps}: "
                                 "such a window never fills, so DMD would never run")
        elif args.accept_rows is not None:  # it sizes DMD's accept test: nothing to apply it to
            raise ValueError("--accept-rows applies only with DMD (--dmd-window, --dmd-rank or "
                             "--dmd-horizon): a plain run has no accept test")
        resolve_device(training.device, source="--device")  # an absent GPU: one line, exit 2
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dataset = load_dataset(problem, cache_dir=args.cache_dir, progress=not args.quiet)
    result = train(dataset=dataset, model=model, training=training, dmd=dmd, progress=not args.quiet)
    _print_metrics(result.metrics | {
        "cost_total": result.backprop_equivalent, "backprop_steps": result.cost["backprop_steps"],
        "forward_passes": result.cost["forward_passes"], "wall_time": result.wall_time,
        "dmd_time": result.dmd_time, "jumps_accepted": result.jumps_accepted,
        "jumps_rejected": result.jumps_rejected, "device": result.device,
    })
    return 0


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--dmd-rank: expected an integer or a fraction, got {text!r}") from None


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:>18}: {value:.6g}")
        else:
            print(f"{key:>18}: {value}")


def cmd_study_run(args) -> int:
    from dmdopt._util import sigterm_as_interrupt
    from dmdopt.errors import WorkersFailed
    from dmdopt.search import load_study_file, run_study

    config = load_study_file(args.file)
    try:
        # `kill`, a scheduler's stop: like Ctrl-C, and passed on to the workers
        with sigterm_as_interrupt():
            run_study(config, n_trials=args.n_trials, storage=args.storage, workers=args.workers,
                      timeout=args.timeout, cache_dir=args.cache_dir, tracking=not args.no_mlflow,
                      tracking_uri=args.tracking_uri, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except WorkersFailed as exc:
        print(f"dmdopt: error: {exc}", file=sys.stderr)
        return 1
    from dmdopt._util import mask_url

    after = "status" if config.mode == "cost_to_target" else "pareto"  # one objective: no front
    if args.storage:
        ref = f"{config.name} --storage {shlex.quote(mask_url(args.storage))}"
    elif config.storage != DEFAULT_STORAGE:  # the file gives it (a bare name would not find it,
        ref = shlex.quote(args.file)         # and a masked URL would not open it)
    else:
        ref = config.name
    print(f"done. next: dmdopt study {after} {ref}")
    return 0


def cmd_study_status(args) -> int:
    from optuna.trial import TrialState

    from dmdopt._util import mask_url

    name, storage, study = _load_study(args)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    ref = study.user_attrs.get("reference")
    print(f"study      {name}  ({mask_url(storage)})")
    print(f"objectives {', '.join(study.metric_names or [])}")
    print("trials     " + "  ".join(f"{k.lower()} {v}" for k, v in counts.items() if v))
    if ref:
        print(f"reference  cost {ref['cost_bpe']:.1f} bpe  val error {ref['val_rel_l2']:.4f}")
        if isinstance(to_target := ref.get("to_target"), dict):  # what the speed-ups divide
            print(f"           to the target {to_target['target_error']:g}: "
                  + (f"cost {to_target['cost_bpe']:.1f} bpe" if to_target.get("reached")
                     else "never reached"))
    if len(study.directions) == 1 and counts["COMPLETE"]:  # cost_to_target: no front to show
        from dmdopt.search.study import trial_cost, trial_knobs

        try:
            best = study.best_trial  # the cheapest trial within max_error_ratio, if one is set
        except ValueError:
            print("best       none: every COMPLETE trial ends beyond the study's max_error_ratio")
            return 0
        cost, missed = trial_cost(best)
        # the study as the user named it here (its file also gives its storage), and an output:
        # `dmdopt export NAME` alone lacks -o, and a bare name the storage of a file
        named = shlex.quote(args.name) + (f" --storage {shlex.quote(mask_url(args.storage))}"
                                          if args.storage else "")
        if not missed:  # reached, but perhaps no sooner than plain training: export refuses
            from dmdopt.search.summary import summarize

            if summarize(study)["recommended"] is None:
                missed = "  (no sooner than plain training)"
        how = (f"dmdopt export {named} -o tuned.toml"
               + (f" --trial {best.number}" if missed else ""))
        print(f"best       trial {best.number}  cost {cost:.1f} bpe{missed}  "
              f"{trial_knobs(best)}  (`{how}` writes it)")
    return 0


def cmd_study_pareto(args) -> int:
    from dmdopt.pareto import pareto_rows
    from dmdopt.search.summary import summarize

    name, storage, study = _load_study(args)
    if len(study.directions) != 2:
        raise UserError(f"study {name!r} is single-objective: it has a best trial, not a front")
    summary = summarize(study, storage_url=storage)
    rows = pareto_rows(summary)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.csv:
        import csv

        from dmdopt.pareto import CSV_COLUMNS

        writer = csv.DictWriter(sys.stdout, fieldnames=list(CSV_COLUMNS),
                                lineterminator="\n")  # a header even if empty
        writer.writeheader()
        writer.writerows(rows)
        return 0
    points = sum(not r["is_reference"] for r in rows)
    if summary.get("reference") is None:
        print(f"study {name} has no reference run yet (its first launcher trains it), so no front",
              file=sys.stderr)
    print(f"Pareto front of {name}: {points} point(s); objectives "
          f"{' / '.join(summary['metric_names'])} (cost = bpe to reach the reference's error)")
    print(f"{'trial':>9} {'cost_bpe':>10} {'val_rel_l2':>11} {'speedup':>8} {'fp x':>6} {'window':>7} "
          f"{'rank':>6} {'horizon':>9}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else (v if isinstance(v, str) else format(v, f))  # noqa: E731
        mark = "  <- recommended" if r["is_recommended"] else ""
        if r["reached_reference"] is False:
            mark += "  (never reached the reference's error: cost = its whole spend)"
        print(f"{r['trial']!s:>9} {fmt(r['cost_bpe'], '.1f'):>10} {fmt(r['val_rel_l2'], '.5f'):>11} "
              f"{fmt(r['speedup'], '.2f'):>8} {fmt(r['speedup_first_passage'], '.2f'):>6} "
              f"{fmt(r['window'], 'd'):>7} {fmt(r['rank'], 'g'):>6} {fmt(r['horizon'], '.4g'):>9}{mark}")
    return 0


def cmd_study_sync(args) -> int:
    from dmdopt._util import mask_url
    from dmdopt.tracking import StudyTracker
    from dmdopt.tracking.runs import _HALF_LOGGED_AFTER_S, check_tracking_uri

    name, storage, summary = _summary(args)
    check_tracking_uri(args.tracking_uri, storage=storage)
    tracker = StudyTracker(args.tracking_uri, name, summary.get("study_uid"), warn=False)
    added = tracker.sync(summary)
    if added is None:  # one line: the tracker's reason, not a warning and then this
        raise UserError(f"sync-mlflow: the MLflow tracking store {mask_url(tracker.tracking_uri)} "
                        f"failed ({tracker.first_failure}); what was logged before the failure "
                        "stays: run the command again")
    print(f"sync-mlflow: {added} trial run(s) added under the parent of study {name}")
    if tracker.pending:  # not "all synced": another process may be writing them, or was cut off
        print(f"sync-mlflow: trial(s) {', '.join(map(str, sorted(tracker.pending)))} left alone: "
              f"a RUNNING child began less than {_HALF_LOGGED_AFTER_S // 60} min ago (another "
              "process writing it, or one cut off); run the command again after that")
    return 0


def cmd_export(args) -> int:
    from dmdopt.export import export_tuned_config
    from dmdopt.search.recommend import parse_policy

    _output_is_not_the_study_file(args)
    if args.trial is not None and (args.policy is not None or args.value is not None):
        flag = "--policy" if args.policy is not None else "--value"
        raise UserError(f"export: --trial {args.trial} exports that trial, {flag} chooses one by "
                        "a rule: give one or the other")
    named = "knee" if args.policy is None else args.policy  # `--policy ''` is no policy
    policy, value = parse_policy(named, args.value)
    _, _, summary = _summary(args, policy=policy, value=value)
    given = args.policy is not None or args.value is not None
    if given and args.trial is None and summary.get("mode") == "cost_to_target":
        print("note: --policy does not apply to a cost_to_target study (one objective, no "
              "front): exporting its best trial", file=sys.stderr)
    tuned = export_tuned_config(summary, args.output, policy=policy, value=value, number=args.trial)
    exp = tuned.expected
    print(f"exported trial {tuned.provenance['trial_number']} "
          f"({tuned.provenance.get('policy', policy)}) to {args.output}: "
          f"window {tuned.dmd.window} rank {tuned.dmd.rank} horizon {tuned.dmd.horizon:g}; "
          f"expected val error {exp.get('val_rel_l2', math.nan):.4f}, speed-up {exp.get('speedup', math.nan):.2f}x"
          + (f" ({exp['speedup_first_passage']:.2f}x against plain training's first passage to "
             "its final error)" if "speedup_first_passage" in exp else ""))
    return 0


def cmd_dashboard(args) -> int:
    from dmdopt._util import os_reason, unwritable
    from dmdopt.tracking.dashboard import write_dashboard

    _output_is_not_the_study_file(args)
    if (why := unwritable(args.output)) is not None:  # `-o out/` wrote a file named `out`
        raise UserError(f"--output: cannot write {args.output}: {why}")
    if Path(args.output).suffix.lower() not in (".html", ".htm"):  # `-o study.toml`, `-o a.png`
        raise UserError(f"--output: the dashboard is one HTML file: name it .html, got "
                        f"{args.output!r}")
    name, _, summary = _summary(args)
    try:
        write_dashboard(summary, args.output)
    except OSError as exc:
        raise UserError(f"--output: cannot write {args.output}: {os_reason(exc, args.output)}") from None
    print(f"dashboard of {name} written to {args.output}")
    return 0


def cmd_ui(args) -> int:
    from dmdopt._util import sigterm_as_interrupt
    from dmdopt.tracking.ui import start_ui, stop_ui

    proc = start_ui(host=args.host, port=args.port, allow_remote=args.allow_remote)

    try:
        with sigterm_as_interrupt():  # SIGTERM (a job scheduler, `timeout`): same as Ctrl-C
            return proc.wait()
    except KeyboardInterrupt:
        stop_ui(proc)  # the server runs in its own process group: end it and its workers
        return 0


def cmd_bench(args) -> int:
    from dmdopt.bench import run_from_args
    from dmdopt.errors import WorkersFailed

    try:
        run_from_args(args, args.parser_error)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (see run_from_args)
        print("interrupted", file=sys.stderr)
        return 130
    except WorkersFailed as exc:  # a --jobs worker killed: what finished is printed and written
        print(f"dmdopt: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmdopt", description="Tune DMD-accelerated training with Optuna; "
                     "track it in MLflow; export the settings production training reads.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("data", help="build or inspect the pollutant dataset (cached)")
    p.add_argument("--grid", type=_positive_int)
    p.add_argument("--samples", type=_positive_int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=_positive_int)
    p.add_argument("--cache-dir", type=_path, default=DEFAULT_CACHE)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train the regressor (plain, with DMD flags, or --config tuned.toml)")
    p.add_argument("--config", type=_path, help="a tuned config written by `dmdopt export`")
    p.add_argument("--steps", type=_positive_int, help="backprop-step budget")
    p.add_argument("--device", type=_nonempty("a device"), help="auto, cpu, cuda, cuda:N")
    # plain-run flags default to None (TrainConfig's / ModelConfig's defaults apply), so that
    # `--config` can tell that one was given and refuse it instead of ignoring it
    p.add_argument("--optimizer", choices=["adam", "sgd"], help="default adam")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--momentum", type=float, help="default 0")
    p.add_argument("--batch-size", type=_positive_int, help="default: full batch")
    p.add_argument("--accept-rows", type=_positive_int,
                   help="training rows of DMD's accept test (default: all; with --batch-size, "
                        "about one batch is cheaper)")
    p.add_argument("--eval-every", type=_positive_int, help="default 50")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--width", type=_positive_int, help="default 128")
    p.add_argument("--depth", type=_positive_int, help="default 3")
    p.add_argument("--activation", help="default tanh")
    p.add_argument("--grid", type=_positive_int)
    p.add_argument("--samples", type=_positive_int)
    # any of the three turns DMD on; the others then take DMDConfig's defaults
    p.add_argument("--dmd-window", type=_positive_int, help="DMD window (default 20)")
    p.add_argument("--dmd-rank", help="POD rank: integer cap, energy fraction, or 0 (default 0.99)")
    p.add_argument("--dmd-horizon", type=float, help="extrapolation horizon in steps, or inf "
                   "(default 20)")
    p.add_argument("--checkpoint-dir", type=_path, help="--config only (default dmdopt-runs/checkpoints)")
    logging_to = p.add_mutually_exclusive_group()  # both: one of them would be ignored
    logging_to.add_argument("--tracking-uri", type=_tracking_uri, help="--config only")
    logging_to.add_argument("--no-mlflow", action="store_true",
                            help="--config runs only (they log to MLflow; a plain run never does)")
    p.add_argument("--cache-dir", type=_path, default=DEFAULT_CACHE)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    study = sub.add_parser("study", help="run and inspect studies")
    ssub = study.add_subparsers(dest="study_command", required=True, parser_class=_Parser)
    p = ssub.add_parser("run", help="create or resume the study in FILE")
    p.add_argument("file")
    p.add_argument("--n-trials", type=_positive_int)
    p.add_argument("--timeout", type=_positive_seconds)
    p.add_argument("--storage", type=_url, help="Optuna storage URL (default: the study file's)")
    p.add_argument("--workers", type=_workers, default=1, help="processes on this machine, or 'auto'")
    logging_to = p.add_mutually_exclusive_group()
    logging_to.add_argument("--tracking-uri", type=_tracking_uri, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///dmdopt-runs/mlflow.db)")
    logging_to.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--cache-dir", type=_path, default=DEFAULT_CACHE)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_study_run)
    for cmd, func, helptext in (("status", cmd_study_status, "trial counts and the reference"),
                                ("pareto", cmd_study_pareto, "the Pareto front with the reference"),
                                ("sync-mlflow", cmd_study_sync, "log trials missing in MLflow")):
        p = ssub.add_parser(cmd, help=helptext)
        p.add_argument("name", help="study name, or its TOML file")
        p.add_argument("--storage", type=_url)
        if cmd == "pareto":
            fmt = p.add_mutually_exclusive_group()
            fmt.add_argument("--json", action="store_true")
            fmt.add_argument("--csv", action="store_true")
        if cmd == "sync-mlflow":
            p.add_argument("--tracking-uri", type=_tracking_uri)
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="write the recommended settings as a tuned config")
    p.add_argument("name", help="study name, or its TOML file")
    p.add_argument("-o", "--output", type=_path, required=True, help="tuned.toml, .json or .yaml")
    p.add_argument("--policy", help="knee (default) | max-error-ratio=R | budget=C")
    p.add_argument("--value", type=float, help="R or C for --policy max-error-ratio / budget")
    p.add_argument("--trial", type=int, help="export this trial instead of the recommendation")
    p.add_argument("--storage", type=_url)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dashboard", help="write the study's offline HTML dashboard")
    p.add_argument("name")
    p.add_argument("-o", "--output", type=_path, required=True)
    p.add_argument("--storage", type=_url)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the default store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=5000)
    p.add_argument("--allow-remote", action="store_true", help="required to bind a non-loopback host")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("bench", help="plain vs DMD-accelerated training, side by side")
    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench, parser_error=p.error)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.formatwarning  # a warning is one line here, not a line + its source line
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"warning: {message}\n"
    try:
        code = int(args.func(args) or 0)
        if code == 0 and argv is None and threading.current_thread() is threading.main_thread():
            # a command-line process whose work is done (its "done." printed): a Ctrl-C in the
            # seconds of teardown that follow (MLflow's and torch's threads) made it exit 130
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except UserError as exc:
        print(f"dmdopt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # a model or window too large for this machine
        from dmdopt.training.loop import Diverged

        if isinstance(exc, Diverged):  # the settings' fault: a learning rate too large
            print(f"dmdopt: error: training diverged: {exc} (a smaller learning rate, --lr or "
                  "training.lr, trains)", file=sys.stderr)
            return 2
        from dmdopt._util import out_of_memory

        if not out_of_memory(exc):
            raise
        print(f"dmdopt: error: out of memory: {str(exc).strip().splitlines()[0][:300]} (a smaller "
              "model.width/depth, dmd.window or problem size fits)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
