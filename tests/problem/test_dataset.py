"""Dataset generation, caching, splits and config hashing on a tiny problem."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import dmdopt.problem.dataset as dataset_mod
from dmdopt.problem import PARAM_NAMES, Dataset, ProblemConfig, load_dataset, solve_field
from dmdopt.problem.dataset import cache_path

TINY = ProblemConfig(grid=16, n_samples=40)


def _boom(**kwargs):
    raise AssertionError("solver must not be called on a cache hit")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Dataset:
    return load_dataset(TINY, cache_dir=tmp_path_factory.mktemp("cache"), workers=1, progress=False)


def test_shapes_dtypes_and_fields_match_solver(built):
    assert built.params.shape == (40, 6) and built.params.dtype == np.float32
    assert built.fields.shape == (40, 16, 16) and built.fields.dtype == np.float32
    assert built.config_hash == TINY.config_hash()
    row = built.params[7].astype(np.float64)
    # solve_field's own defaults (the documented call) are the dataset's: was width 0.05
    assert TINY.source_width == ProblemConfig().source_width
    expected = solve_field(**dict(zip(PARAM_NAMES, row.tolist(), strict=True)), grid=16)
    np.testing.assert_allclose(built.fields[7], expected, rtol=1e-6, atol=1e-9)
    assert np.all(built.fields >= 0)


def test_cache_hit_is_identical_and_does_not_recompute(tmp_path, monkeypatch):
    first = load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert cache_path(TINY, tmp_path).is_file()
    monkeypatch.setattr(dataset_mod, "solve_field", _boom)
    second = load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    for name in ("params", "fields", "train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert second.path == cache_path(TINY, tmp_path)
    # ...and a different config is not served from that cache.
    with pytest.raises(AssertionError, match="must not be called"):
        load_dataset(
            dataclasses.replace(TINY, seed=1), cache_dir=tmp_path, workers=1, progress=False
        )


def test_parallel_build_matches_in_process(built, tmp_path):
    par = load_dataset(TINY, cache_dir=tmp_path, workers=2, progress=False)
    np.testing.assert_array_equal(par.fields, built.fields)
    np.testing.assert_array_equal(par.params, built.params)


def test_partial_temp_file_is_not_a_cache(tmp_path, monkeypatch):
    final = cache_path(TINY, tmp_path)
    (tmp_path / f".{final.name}.abc123.tmp").write_bytes(b"PK\x03\x04 half written")  # atomic_file's name
    calls = []
    real = dataset_mod.solve_field
    monkeypatch.setattr(dataset_mod, "solve_field", lambda **kw: calls.append(1) or real(**kw))
    ds = load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert len(calls) == TINY.n_samples and final.is_file()
    assert ds.fields.shape == (40, 16, 16)


def test_corrupt_cache_is_rebuilt(tmp_path, built):
    final = cache_path(TINY, tmp_path)
    final.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    np.testing.assert_array_equal(ds.fields, built.fields)
    with np.load(final) as z:  # the rebuilt file replaced the corrupt one
        assert str(z["config_hash"]) == TINY.config_hash()


def test_a_cache_file_that_disagrees_with_its_config_is_rebuilt(tmp_path, built):
    """The hash, shapes and dtypes matched, so a file with a leaking split (test rows inside
    train) or NaN fields was served; inputs and splits are recomputed and compared."""
    final = cache_path(TINY, tmp_path)
    arrays = {name: getattr(built, name).copy()
              for name in ("params", "fields", "train_idx", "val_idx", "test_idx")}
    for damage in ("split", "nan", "params"):
        bad = {k: v.copy() for k, v in arrays.items()}
        if damage == "split":
            bad["test_idx"] = bad["train_idx"][: len(bad["test_idx"])]
        elif damage == "nan":
            bad["fields"][3, 2, 2] = np.nan
        else:
            bad["params"][0, 0] += 0.01
        np.savez(final, **bad, config_hash=np.array(TINY.config_hash()))
        with pytest.warns(UserWarning, match="does not match"):
            ds = load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
        np.testing.assert_array_equal(ds.test_idx, built.test_idx)
        np.testing.assert_array_equal(ds.fields, built.fields)


def test_a_failing_parallel_build_stops_without_solving_the_rest(tmp_path):
    """Leaving the process pool waited for every queued chunk before the error came out (a
    Ctrl-C likewise): the queued chunks are now cancelled."""
    import time

    many = dataclasses.replace(TINY, n_samples=2000, grid=24)
    params = dataset_mod.sample_params(many).astype(np.float32)
    params[0, 4] = -1.0  # a negative diffusivity: the first chunk fails
    started = time.monotonic()
    with pytest.raises(ValueError):
        dataset_mod.build_fields(params, many, workers=2, progress=False)
    took = time.monotonic() - started
    full = time.monotonic()
    dataset_mod.build_fields(params[1:], many, workers=2, progress=False)
    full = time.monotonic() - full
    assert took < 0.5 * full, (took, full)


def test_a_sample_without_wind_or_decay_is_one_line_before_any_solve(tmp_path):
    """No wind and no decay has no steady state: was a traceback from the solver workers."""
    from dmdopt.errors import UserError

    still = ProblemConfig(grid=8, n_samples=20, wind_x=[0.0, 0.0], wind_y=[0.0, 0.0], decay=[0.0, 0.0])
    with pytest.raises(UserError, match="sample 0 has no wind and no decay"):
        load_dataset(still, cache_dir=tmp_path, workers=2, progress=False)
    assert not list(tmp_path.glob("*.npz"))


def test_workers_default_to_the_cores_this_process_may_use(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataset_mod._resolve_workers(None) == 1


def test_failed_build_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_mod, "solve_field", _boom)
    with pytest.raises(AssertionError):
        load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    def half_write(fh, **arrays):
        fh.write(b"PK\x03\x04 some bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset_mod.np, "savez", half_write)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(TINY, cache_dir=tmp_path, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_splits_disjoint_covering_and_deterministic(built):
    idx = [built.indices(name) for name in ("train", "val", "test")]
    assert [len(i) for i in idx] == [32, 4, 4]
    allidx = np.concatenate(idx)
    assert len(np.unique(allidx)) == len(allidx) == TINY.n_samples
    X, Y = built.split("val")
    assert X.shape == (4, 6) and Y.shape == (4, 16 * 16)
    np.testing.assert_array_equal(Y[1], built.fields[built.val_idx[1]].ravel())
    again = dataset_mod.split_indices(TINY)
    np.testing.assert_array_equal(again["test"], built.test_idx)
    other = dataset_mod.split_indices(dataclasses.replace(TINY, seed=5))
    assert not np.array_equal(other["test"], built.test_idx)
    with pytest.raises(ValueError, match="'bogus'"):
        built.split("bogus")


def test_params_within_ranges_and_space_filling(built):
    for col, name in enumerate(PARAM_NAMES):
        lo, hi = getattr(TINY, name)
        vals = built.params[:, col]
        assert np.all((vals >= np.float32(lo)) & (vals <= np.float32(hi))), name
        # Sobol': each half of every range is hit (i.i.d. would miss with p ~ 1e-12 only,
        # but a broken mapping e.g. to [0, 1) would fail).
        mid = np.sqrt(lo * hi) if name == "diffusivity" else 0.5 * (lo + hi)
        assert 10 <= np.sum(vals < mid) <= 30, name


def test_config_hash_changes_with_every_field():
    base = ProblemConfig()
    assert base.config_hash() == ProblemConfig().config_hash()
    assert len(base.config_hash()) == 16
    seen = {base.config_hash()}
    for f in dataclasses.fields(ProblemConfig):
        v = getattr(base, f.name)
        if isinstance(v, tuple):
            new = (v[0] * 0.5, v[1])  # (sources must stay on the unit square)
        elif isinstance(v, int):
            new = v + 1
        else:
            new = v * 0.5
        h = dataclasses.replace(base, **{f.name: new}).config_hash()
        assert h not in seen, f.name
        seen.add(h)


def test_config_dict_roundtrip_and_validation():
    cfg = ProblemConfig(grid=32, diffusivity=[0.02, 0.05])
    assert cfg.diffusivity == (0.02, 0.05)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = ProblemConfig.from_dict(d)
    assert back == cfg and back.config_hash() == cfg.config_hash()
    with pytest.raises(ValueError, match="unknown problem keys: \\['gird'\\]"):
        ProblemConfig.from_dict({"gird": 32})
    with pytest.raises(ValueError, match="diffusivity"):
        ProblemConfig.from_dict({"diffusivity": [0.0, 0.1]})
    with pytest.raises(ValueError, match="wind_x"):
        ProblemConfig.from_dict({"wind_x": [1.0, -1.0]})
    # a source off the unit square solved to all-zero fields, then "diverged" in training
    with pytest.raises(ValueError, match=r"problem.source_x must lie within 3 source widths of "
                                         r"the unit square, \[-0.3, 1.3\].*\[5.0, 9.0\]"):
        ProblemConfig.from_dict({"source_x": [5, 9]})
    assert ProblemConfig(source_y=(-0.3, 1.3)).source_y == (-0.3, 1.3)  # near it: a field
    with pytest.raises(ValueError, match="problem.grid must be an int"):
        ProblemConfig.from_dict({"grid": "64"})
    with pytest.raises(ValueError, match="val_fraction"):
        ProblemConfig(val_fraction=0.6, test_fraction=0.5)
    # every split must hold a sample: training, the learning curve and the metrics need them
    with pytest.raises(ValueError, match=r"n_samples = 3 leaves the val split empty.*val_fraction"):
        ProblemConfig(n_samples=3)
    with pytest.raises(ValueError, match="leaves the test split empty.*test_fraction"):
        ProblemConfig(n_samples=100, test_fraction=0.0)
    with pytest.raises(ValueError, match="leaves the train split empty"):
        ProblemConfig(n_samples=2, val_fraction=0.5, test_fraction=0.4)
    assert ProblemConfig(n_samples=10).n_samples == 10  # 8 / 1 / 1
    # a string was iterated as characters: "01" gave the range (0, 1); a bool was a number
    for bad in ("01", [True, 1], [0.1], [0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match="problem.wind_x must be a \\(low, high\\) pair"):
            ProblemConfig(wind_x=bad)
    assert ProblemConfig(wind_x=[0.0, 0.0], decay=[0.0, 1.0]).decay == (0.0, 1.0)  # a box is fine
    with pytest.raises(ValueError, match="problem.source_strength must be > 0"):
        ProblemConfig(source_strength=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grid = 8  # type: ignore[misc]


def test_describe(built):
    info = built.describe()
    json.dumps(info)  # must be JSON-serialisable for the CLI
    assert info["config_hash"] == TINY.config_hash()
    assert info["splits"] == {"train": 32, "val": 4, "test": 4}
    assert info["field_min"] >= 0 and info["field_max"] > info["field_mean"] > 0
    assert info["ranges"]["diffusivity"]["log"] is True


def test_a_dataset_too_big_for_memory_is_refused_before_any_work(tmp_path, monkeypatch):
    from dmdopt.errors import UserError

    monkeypatch.setattr(dataset_mod, "_physical_memory", lambda: 2**30)  # a 1 GiB machine
    config = ProblemConfig(grid=1024, n_samples=300)  # 1.17 GiB of fields
    with pytest.raises(UserError, match=r"300 fields at grid 1024 need 1.17 GiB.*problem.grid"):
        load_dataset(config, cache_dir=tmp_path, workers=1, progress=False)
    assert not list(tmp_path.iterdir())
