"""`dmdopt bench`: plain vs DMD rows, side by side, written as JSON with the documented keys."""

from __future__ import annotations

import json

import pytest
from processes import alive, children

from dmdopt.cli import main


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



@pytest.mark.slow
def test_sigterm_to_a_parallel_bench_stops_its_workers(tmp_path):
    """`kill PID` of `dmdopt bench --jobs 2` used to leave both pair workers training on."""
    import os
    import signal
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
