"""`dmdopt bench`: plain vs DMD rows, side by side, written as JSON with the documented keys."""

from __future__ import annotations

import json

import pytest
from processes import alive, children

from dmdopt.cli import main
from dmdopt.training.config import DMDConfig


def test_bench_json_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--seeds", "1", "--steps", "40", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cost x" in printed and "adam" in printed
    rows = json.loads(out.read_text())
    dmd_rows = [r for r in rows if r["variant"] == "dmd"]
    assert {r["method"] for r in dmd_rows} == {"adam+dmd", "gd+dmd", "sgd_momentum+dmd"}
    for row in rows:
        assert {"method", "seed", "cost_to_target", "wall_to_target", "final_val_error",
                "speedup"} <= set(row)
    for row in dmd_rows:
        if row["speedup"] is not None:
            plain = next(r for r in rows if r["variant"] == "plain" and r["seed"] == row["seed"]
                         and row["method"].startswith(r["method"]))
            assert abs(row["speedup"] - plain["cost"] / row["cost_to_target"]) < 1e-9
            # the plain curve's own first passage to its final error is never after its end,
            # so the stricter ratio is never the larger one
            assert 0 < plain["first_passage_cost"] <= plain["cost"]
            assert abs(row["first_passage_speedup"]
                       - plain["first_passage_cost"] / row["cost_to_target"]) < 1e-9
            assert row["first_passage_speedup"] <= row["speedup"] + 1e-12
    for row in dmd_rows:
        # the accept/reject forward passes are the accelerator's wall time too: the share
        # without them was the only one reported
        assert 0 < row["dmd_share"] < row["accelerator_share"] < 1
    assert "acc%" in printed and "with its forwards" in printed


def test_parallel_jobs_give_the_rows_of_a_sequential_run(tmp_path, monkeypatch):
    """`--jobs 2` runs the (method, seed) pairs in two processes; with one thread each, the
    costs and errors are those of a sequential one-thread run, in the same row order."""
    import torch

    from dmdopt.bench import run_benchmark

    monkeypatch.chdir(tmp_path)
    kwargs = dict(quick=True, seeds=2, steps=40, methods=("gd", "adam"), lrs={"gd": 4.0},
                  echo=lambda *_: None, cache_dir=str(tmp_path / "data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = run_benchmark(**kwargs)
    finally:
        torch.set_num_threads(threads)
    parallel = run_benchmark(jobs=2, threads=1, **kwargs)
    keys = ("method", "variant", "seed", "lr", "final_val_error", "cost", "cost_to_target",
            "jumps_accepted", "jumps_rejected")
    assert len(sequential) == 8
    assert ([[r.get(k) for k in keys] for r in parallel]
            == [[r.get(k) for k in keys] for r in sequential])
    assert {r["lr"] for r in sequential if r["method"].startswith("gd")} == {4.0}  # --lr override



def _parallel_bench_in_training(tmp_path):
    """(process, its children): `dmdopt bench --jobs 2`, once both pair workers train."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dmdopt", "bench", "--quick", "--seeds", "2",
                             "--methods", "gd", "--jobs", "2", "--steps", "20000"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the dataset is built (by workers of its own) before this line
        if line.startswith("DMD:"):
            break
    for _ in range(120):  # then the two pair workers start (beside multiprocessing's tracker)
        if len(children(proc.pid)) >= 3:
            break
        time.sleep(0.5)
    kids = children(proc.pid)
    assert len(kids) >= 3, "the workers did not start"
    time.sleep(2)  # into their training
    return proc, kids


@pytest.mark.slow
def test_sigterm_to_a_parallel_bench_stops_its_workers(tmp_path):
    """`kill PID` of `dmdopt bench --jobs 2` used to leave both pair workers training on."""
    import signal
    import time

    proc, kids = _parallel_bench_in_training(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    for _ in range(40):
        running = [k for k in kids if alive(k)]
        if not running:
            break
        time.sleep(0.25)
    assert not running, f"bench workers {running} still running after the launcher was stopped"


def test_dmd_option_takes_a_ladder(monkeypatch):
    """`--dmd line_search=a:b` is the ladder (',' separates fields, so a list needs its own)."""
    import dmdopt.bench

    seen = {}
    monkeypatch.setattr(dmdopt.bench, "run_benchmark", lambda **kw: seen.update(kw) or [])
    assert main(["bench", "--methods", "gd", "--dmd", "window=10,line_search=0.25:1:4"]) == 0
    assert seen["dmd"].line_search == (0.25, 1.0, 4.0) and seen["dmd"].window == 10


def _rows(method, seed, plain_cost, to_target, dmd_error=0.1):
    """A (plain, DMD) pair of rows as `_run_pair` returns them; to_target None = a miss."""
    plain = {"method": method, "variant": "plain", "seed": seed, "lr": 1.0,
             "final_val_error": 0.2, "cost": plain_cost, "wall_time": 10.0,
             "cost_to_target": plain_cost, "wall_to_target": 10.0, "speedup": 1.0,
             "first_passage_cost": plain_cost, "first_passage_wall": 10.0}
    hit = to_target is not None
    dmd = {"method": f"{method}+dmd", "variant": "dmd", "seed": seed, "lr": 1.0,
           "final_val_error": dmd_error, "cost": plain_cost, "wall_time": 10.0,
           "cost_to_target": to_target, "wall_to_target": to_target / 100 if hit else None,
           "speedup": plain_cost / to_target if hit else None,
           "first_passage_speedup": plain_cost / to_target if hit else None,
           "wall_speedup": 10.0 / (to_target / 100) if hit else None,
           "dmd_share": 0.03, "accelerator_share": 0.08, "fwd_share": 0.05, "jumps_accepted": 1,
           "jumps_rejected": 0}
    return [plain, dmd]


def _table_line(rows, method="gd"):
    from dmdopt.bench import _table

    lines = []
    _table(rows, (method,), lines.append)
    return next(line for line in lines if line.startswith(method)).split()


def test_a_seed_that_missed_the_target_counts_in_the_medians():
    """The medians dropped the seed that missed: 500, 1000 and a miss printed 750 and 3.00x."""
    rows = [*_rows("gd", 0, 2000, 500), *_rows("gd", 1, 2000, 1000),
            *_rows("gd", 2, 2000, None, dmd_error=float("inf"))]  # missed, then diverged
    cols = _table_line(rows)
    # method lr | plain err bpe s | dmd err, bpe->tgt, s->tgt, reached | cost x, fp x, wall x ...
    assert cols[7:11] == ["0.1000", "1000", "10.0", "2/3"]
    assert cols[12:15] == ["2.00", "2.00", "1.00"]  # wall x: the median of per-seed ratios
    two_missed = [*_rows("gd", 0, 2000, 500), *_rows("gd", 1, 2000, None),
                  *_rows("gd", 2, 2000, None)]
    cols = _table_line(two_missed)
    assert cols[8:11] == ["-", "-", "1/3"] and cols[12:15] == ["-", "-", "-"]
    # an even count: the worse middle value, not the mean of a hit (4.00x) and a miss (2.00x)
    cols = _table_line([*_rows("gd", 0, 2000, 500), *_rows("gd", 1, 2000, None)])
    assert cols[8:11] == ["-", "-", "1/2"] and cols[12:15] == ["-", "-", "-"]
    # an even count without a miss: the mean of the middle two, as plain's columns take it
    # (the worse one was taken for every even count: 2.00x of 4.00x and 2.00x)
    cols = _table_line([*_rows("gd", 0, 2000, 500), *_rows("gd", 1, 2000, 1000)])
    assert cols[8:11] == ["750", "7.5", "2/2"] and cols[12:14] == ["3.00", "3.00"]


def test_a_learning_rate_that_diverges_at_once_is_a_row_not_an_abort(tmp_path):
    """The untimed warm-up steps diverged before the plain run's own check: the whole
    benchmark stopped with "training diverged" instead of naming the seed."""
    from dmdopt.bench import run_benchmark

    lines = []
    rows = run_benchmark(quick=True, seeds=1, steps=20, methods=("gd",), lrs={"gd": 1e4},
                         echo=lines.append, cache_dir=str(tmp_path / "data"))
    assert [(r["method"], r["variant"]) for r in rows] == [("gd", "plain")] and rows[0]["error"]
    assert any("the plain run diverged at seed(s) 0" in line for line in lines)


def test_failed_pairs_keep_the_finished_ones_and_the_json_is_strict(tmp_path, monkeypatch,
                                                                   capsys):
    """A diverged plain run was dropped from the table and the JSON; a diverged DMD run's
    error was written as `Infinity` (not JSON); a pair that raised lost every finished row."""
    import dmdopt.bench

    def fake_pair(*, method, seed, **_):
        if method == "adam":
            raise RuntimeError("a bug in one pair")
        if seed == 0:
            return [{"method": "gd", "variant": "plain", "seed": 0, "lr": 8.0,
                     "final_val_error": None, "error": "loss is nan"}], "gd seed 0: diverged"
        return _rows("gd", seed, 2000, 800, dmd_error=float("inf")), f"gd seed {seed}"

    monkeypatch.setattr(dmdopt.bench, "_run_pair", fake_pair)
    monkeypatch.setattr(dmdopt.bench, "_dataset", lambda *a: None)
    out = tmp_path / "rows.json"
    with pytest.raises(RuntimeError, match="a bug in one pair"):
        dmdopt.bench.run_benchmark(seeds=2, methods=("gd", "adam"), json_path=out,
                                   echo=print)
    printed = capsys.readouterr().out
    assert "gd: the plain run diverged at seed(s) 0" in printed
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert [(r["method"], r["seed"]) for r in rows] == [("gd", 0), ("gd", 1), ("gd+dmd", 1)]
    assert rows[0]["error"] == "loss is nan" and rows[2]["final_val_error"] is None


def test_an_interrupted_bench_prints_and_writes_the_pairs_that_finished(tmp_path, monkeypatch,
                                                                        capsys):
    """Ctrl-C or SIGTERM after some pairs finished wrote no JSON and printed no table; one
    before any finished leaves an earlier file of that name alone."""
    import dmdopt.bench

    def fake_pair(*, method, seed, **_):
        if method == "adam":
            raise KeyboardInterrupt
        return _rows("gd", seed, 2000, 800), f"gd seed {seed}"

    monkeypatch.setattr(dmdopt.bench, "_run_pair", fake_pair)
    monkeypatch.setattr(dmdopt.bench, "_dataset", lambda *a: None)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        dmdopt.bench.run_benchmark(seeds=1, methods=("gd", "adam"), json_path=out, echo=print)
    rows = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("gd", 0), ("gd+dmd", 0)]
    assert "(the pairs that finished)" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):  # nothing finished: the earlier rows stay
        dmdopt.bench.run_benchmark(seeds=1, methods=("adam",), json_path=out, echo=print)
    assert json.loads(out.read_text()) == rows


def test_the_benchmark_script_refuses_in_one_line_and_reads_a_trailing_comma(monkeypatch,
                                                                             capsys):
    """benchmarks/bench_dmd.py printed argparse's usage before its error; `window=10,` was
    "unknown key ''"."""
    import dmdopt.bench

    with pytest.raises(SystemExit) as info:
        dmdopt.bench.main(["--dmd", "window=abc"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0 and "dmd.window" in err
    seen = {}
    monkeypatch.setattr(dmdopt.bench, "run_benchmark", lambda **kw: seen.update(kw) or [])
    dmdopt.bench.main(["--methods", "gd", "--dmd", "window=10,"])
    assert seen["dmd"].window == 10


@pytest.mark.parametrize(("argv", "needle"), [
    (["--json", "quick.toml"], "--json: expected a path ending in .json, got quick.toml"),
    (["--quick", "--steps", "10"], "--steps 10 is fewer than the DMD window (20"),
    (["--steps", "12", "--dmd", "window=5,warmup=8"], "(13 steps before the first jump)"),
    (["--quick", "--dmd", "warmup=700"], "the budget of 600 steps (--steps) is fewer than"),
    (["--methods", "gd", "--lr", "adam=1"], "'adam' is not among --methods gd"),
    (["--methods", "gd", "--lr", "gd=1", "--lr", "gd=2"], "'gd' is given twice"),
])
def test_bench_arguments_that_would_be_ignored_are_refused(argv, needle, capsys):
    """Each ran before: a "DMD" run without a jump (cost x 1.00), or an --lr silently unused."""
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0


@pytest.mark.slow
def test_a_killed_bench_worker_is_one_line_and_exit_1(tmp_path):
    """A --jobs worker killed (the OOM killer, kill -9) gave a BrokenProcessPool traceback."""
    import os
    import signal
    import time

    proc, kids = _parallel_bench_in_training(tmp_path)
    workers = [k for k in kids if b"resource_tracker" not in open(f"/proc/{k}/cmdline", "rb").read()]
    os.kill(workers[0], signal.SIGKILL)  # a pair worker, not multiprocessing's tracker
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "a --jobs worker process died" in err and err.strip().count("\n") == 0, err
    time.sleep(1)
    assert not [k for k in kids if alive(k)]


def test_bench_lr_takes_each_methods_defaults_and_prints_best_against_best(monkeypatch, capsys):
    """`benchmarks/bench_lr.py --method adam` (its table crashed on the method's default
    targets once every run had finished): the rates and targets of the method, and the best
    DMD cost over rates against the best plain one, a miss counting as never."""
    import importlib.util
    import math
    import sys
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "bench_lr.py"
    spec = importlib.util.spec_from_file_location("bench_lr", path)
    bench_lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_lr)
    seen = {}

    def fake_run(lrs, seeds, steps, targets, *, method):
        seen.update(lrs=lrs, targets=targets, method=method)
        cost = {"plain": {3e-3: 1000.0, 5e-3: 800.0, 1e-2: math.inf},
                "dmd": {3e-3: 700.0, 5e-3: 600.0, 1e-2: 100.0}}
        return [{"lr": lr, "seed": s, "variant": v,
                 "costs": {t: cost[v][lr] if t > min(targets) or lr != 1e-2 else math.inf
                           for t in targets}}
                for lr in lrs for s in range(seeds) for v in ("plain", "dmd")]

    monkeypatch.setattr(bench_lr, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_lr.py", "--method", "adam", "--seeds", "1"])
    bench_lr.main()
    assert seen == {"lrs": (3e-3, 5e-3, 1e-2), "targets": (0.10, 0.08, 0.07, 0.0637),
                    "method": "adam"}
    lines = capsys.readouterr().out.splitlines()
    assert "to 0.0637" in lines[0]
    best = lines[-1].split()
    # to 0.1: dmd's best 100 (lr 1e-2) / plain's best 800; to 0.0637: 600 / 800
    assert best[:2] == ["best", "dmd/plain"] and best[2] == "0.12x" and best[-1] == "0.75x"


def test_the_time_delay_probe_is_exact_for_heavy_ball_where_the_default_fit_is_not(capsys):
    """`benchmarks/probe_delay_dmd.py` backs a claim in benchmarks/FINDINGS.md: its exactness part must hold."""
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "probe_delay_dmd.py"
    spec = importlib.util.spec_from_file_location("probe_delay_dmd", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.exactness()
    rows = re.findall(r"first-order DMD (\S+), time-delay DMD \(q = 2\) (\S+)", capsys.readouterr().out)
    assert len(rows) == 3
    for first, delay in rows:
        assert float(first.rstrip(",")) > 1.0 and float(delay) < 1e-8


def test_json_paths_that_are_no_rows_file_are_refused_before_anything_is_made(tmp_path, monkeypatch,
                                                                               capsys):
    """`--json newdir/quick.toml` made newdir/ before refusing; a JSON tuned config was
    overwritten with the rows."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["bench", "--json", "newdir/sub/quick.toml"])
    assert info.value.code == 2 and not (tmp_path / "newdir").exists()
    (tmp_path / "tuned.json").write_text(json.dumps({"schema_version": 1, "dmd": {}}))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--json", "tuned.json"])
    assert info.value.code == 2 and "is a tuned config" in capsys.readouterr().err
    assert json.loads((tmp_path / "tuned.json").read_text())["schema_version"] == 1


def test_a_diverged_dmd_row_has_every_key_a_finished_one_has(tmp_path, monkeypatch):
    """It lacked cost, wall_time, the shares and the jump counts: the JSON rows of one variant
    did not share a layout."""
    import dmdopt.training.loop as loop
    from dmdopt.bench import run_benchmark

    real = loop.train

    def dmd_diverges(**kwargs):
        if kwargs.get("dmd") is not None:
            raise loop.Diverged("loss became inf at step 20")
        return real(**kwargs)

    kwargs = dict(quick=True, steps=20, methods=("gd",), echo=lambda *_: None,
                  cache_dir=str(tmp_path / "data"), dmd=DMDConfig(window=5, rank=2, horizon=5))
    finished = run_benchmark(**kwargs)[1]
    monkeypatch.setattr(loop, "train", dmd_diverges)
    diverged = run_benchmark(**kwargs)[1]
    assert diverged["error"] and finished["variant"] == diverged["variant"] == "dmd"
    assert set(finished) <= set(diverged)
    assert all(diverged[k] is None for k in set(finished) - {"method", "variant", "seed", "lr",
                                                            "final_val_error"})
