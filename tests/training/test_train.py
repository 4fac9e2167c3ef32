"""Plain training: scaling on the training split only, metrics, cost accounting, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmdopt import DMDConfig, ModelConfig, TrainConfig, train
from dmdopt.model import Scaling

SMALL = ModelConfig(width=16, depth=2)


def test_scaling_is_fitted_on_training_split_only(tiny_dataset):
    x_tr, y_tr = tiny_dataset.split("train")
    x_all = tiny_dataset.params
    result = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(max_steps=5, eval_every=5))
    net = result.model
    assert np.allclose(net.x_mean.numpy(), x_tr.mean(axis=0), atol=1e-6)
    assert not np.allclose(net.x_mean.numpy(), x_all.mean(axis=0), atol=1e-6)
    assert math.isclose(float(net.y_std), float(y_tr.std()), rel_tol=1e-5)
    # the module maps raw inputs to raw outputs: scaled prediction undone exactly
    x = torch.as_tensor(x_tr[:3])
    assert torch.allclose(net(x), net.forward_scaled(x) * net.y_std + net.y_mean)


def test_scaling_guards_constant_columns():
    x = np.ones((10, 2), np.float32)
    y = np.zeros((10, 4), np.float32)
    s = Scaling.fit(x, y)
    assert np.all(s.x_std == 1.0) and s.y_std == 1.0


def test_plain_cost_is_backprop_steps_and_metrics_are_sane(tiny_dataset):
    cfg = TrainConfig(optimizer="adam", lr=0.01, max_steps=40, eval_every=10)
    result = train(dataset=tiny_dataset, model=SMALL, training=cfg)
    assert result.cost["backprop_steps"] == 40
    assert result.cost["forward_passes"] == 0 and result.cost["dmd_flops"] == 0
    assert result.backprop_equivalent == 40
    assert [p["step"] for p in result.curve] == [0, 10, 20, 30, 40]
    assert [p["cost"] for p in result.curve] == [0, 10, 20, 30, 40]
    assert result.curve[-1]["val_error"] < result.curve[0]["val_error"]
    m = result.metrics
    assert set(m) >= {"val_mse", "val_rel_l2", "val_r2", "test_mse", "test_rel_l2", "test_r2"}
    assert 0 < m["val_rel_l2"] < 1 and m["val_r2"] <= 1
    assert result.wall_time > 0 and result.stopped_by == "budget"


def test_dmd_cost_adds_forward_passes_and_flops(tiny_dataset):
    cfg = TrainConfig(optimizer="sgd", lr=0.05, max_steps=40, eval_every=10)
    dmd = DMDConfig(window=5, rank=3, horizon=20)
    result = train(dataset=tiny_dataset, model=SMALL, training=cfg, dmd=dmd)
    c = result.cost
    jumps = result.jumps_accepted + result.jumps_rejected
    assert jumps == 40 // 5
    assert c["forward_passes"] > 0 and c["dmd_flops"] > 0
    expected = c["backprop_steps"] + c["forward_passes"] / 3 + c["dmd_flops"] / c["flops_per_backprop"]
    assert math.isclose(result.backprop_equivalent, expected)
    assert result.backprop_equivalent > 40


def test_same_seed_same_metrics_and_other_seed_differs(tiny_dataset):
    cfg = TrainConfig(max_steps=20, eval_every=10, seed=3)
    a = train(dataset=tiny_dataset, model=SMALL, training=cfg)
    b = train(dataset=tiny_dataset, model=SMALL, training=cfg)
    c = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(max_steps=20, eval_every=10, seed=4))
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_minibatch_and_target_error_stop(tiny_dataset):
    cfg = TrainConfig(max_steps=500, eval_every=5, batch_size=8, lr=0.01, target_error=0.9)
    result = train(dataset=tiny_dataset, model=SMALL, training=cfg)
    assert result.stopped_by == "target" and result.cost["backprop_steps"] < 500
    assert result.curve[-1]["val_error"] <= 0.9


def test_cost_to_reach_never_counts_the_starting_point(tiny_dataset):
    # a target at or above the starting error is reached at the first evaluation after a
    # step, as the reference's `to_target` has it, never at cost 0 (a 0 made speed-ups 0)
    cfg = TrainConfig(optimizer="adam", lr=0.01, max_steps=20, eval_every=5)
    result = train(dataset=tiny_dataset, model=SMALL, training=cfg)
    start = result.curve[0]
    assert start["step"] == 0
    cost, _wall = result.cost_to_reach(start["val_error"] + 1.0)
    assert cost == result.curve[1]["cost"] > 0
    assert result.cost_to_reach(-1.0) is None


def test_extending_a_run_cut_off_schedule_matches_the_uninterrupted_run(tiny_dataset, tmp_path):
    """A 25-step run (eval_every 10) ends with a point at 25, and a target met there; resumed
    to 40 steps, it must go on as the uninterrupted run does, which evaluates at 30 only."""
    base = dict(max_steps=40, eval_every=10, lr=3e-3, seed=1)
    dmd = DMDConfig(window=5, rank=3, horizon=20.0)
    probe = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(**base), dmd=dmd)
    short = train(dataset=tiny_dataset, model=SMALL,
                  training=TrainConfig(**base | {"max_steps": 25}), dmd=dmd)
    v20 = next(p["val_error"] for p in probe.curve if p["step"] == 20)
    assert short.curve[-1]["step"] == 25 and short.val_error < v20  # else the case is not built
    target = (v20 + short.val_error) / 2
    straight = train(dataset=tiny_dataset, model=SMALL,
                     training=TrainConfig(**base, target_error=target), dmd=dmd)
    ckpt = tmp_path / "run.pt"
    cut = train(dataset=tiny_dataset, model=SMALL, dmd=dmd, checkpoint_path=ckpt, checkpoint_every=10,
                training=TrainConfig(**base | {"max_steps": 25}, target_error=target))
    assert cut.curve[-1]["step"] == 25
    resumed = train(dataset=tiny_dataset, model=SMALL, dmd=dmd, checkpoint_path=ckpt,
                    checkpoint_every=10, training=TrainConfig(**base, target_error=target))
    assert [p["step"] for p in resumed.curve] == [p["step"] for p in straight.curve]
    assert resumed.stopped_by == straight.stopped_by
    assert resumed.metrics == straight.metrics


def test_ctrl_c_during_a_checkpoint_save_waits_for_the_save(tiny_dataset, tmp_path, monkeypatch):
    """Ctrl-C landing inside torch.save broke the zip writer (a RuntimeError, exit 1): it is
    raised once the save is done, as a KeyboardInterrupt, with that checkpoint complete."""
    import os
    import signal

    real_save, saves = torch.save, []

    def save_with_ctrl_c(obj, fh, *args, **kwargs):
        saves.append(obj["state"]["step"])
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered before the save below starts
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_with_ctrl_c)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(dataset=tiny_dataset, model=SMALL, checkpoint_path=ckpt, checkpoint_every=10,
              training=TrainConfig(max_steps=60, eval_every=10))
    assert saves == [10, 20]
    assert torch.load(ckpt, weights_only=False)["state"]["step"] == 20  # the interrupted save
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_that_does_not_fit_is_named_and_out_of_memory_is_not(tiny_dataset, tmp_path,
                                                                        monkeypatch):
    """Another model's checkpoint is a CheckpointMismatch; an allocator failure while loading
    a good one stays an out-of-memory error (not "delete it")."""
    from dmdopt.training.loop import CheckpointMismatch

    ckpt = tmp_path / "run.pt"
    config = TrainConfig(max_steps=10, eval_every=10)
    train(dataset=tiny_dataset, model=SMALL, training=config, checkpoint_path=ckpt)
    with pytest.raises(CheckpointMismatch, match="does not fit this run"):
        train(dataset=tiny_dataset, model=ModelConfig(width=8, depth=2), training=config,
              checkpoint_path=ckpt)

    def full(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", full)
    with pytest.raises(torch.OutOfMemoryError):
        train(dataset=tiny_dataset, model=SMALL, training=config, checkpoint_path=ckpt)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_train_flushes_denormals_while_it_runs_and_puts_back_the_callers_mode(tiny_dataset,
                                                                            caller_flushes):
    """Flushing denormals is a CPU mode that outlives the call: `train` left it on in the
    program that called it, whose own float code then lost its denormals."""
    from dmdopt.training.loop import denormals_flushed

    torch.set_flush_denormal(caller_flushes)
    try:
        seen = []
        train(dataset=tiny_dataset, model=SMALL, on_eval=lambda _: seen.append(denormals_flushed()),
              training=TrainConfig(max_steps=5, eval_every=5, device="cpu"))
        assert seen and all(seen)  # on while it trains
        assert denormals_flushed() is caller_flushes

        def stop(point):
            raise RuntimeError("stop here")

        with pytest.raises(RuntimeError, match="stop here"):  # also after an error in the run
            train(dataset=tiny_dataset, model=SMALL, on_eval=stop,
                  training=TrainConfig(max_steps=5, eval_every=5, device="cpu"))
        assert denormals_flushed() is caller_flushes
        torch.set_default_dtype(torch.float64)  # 1e-40 is no denormal in float64
        assert denormals_flushed() is caller_flushes
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_flush_denormal(False)


def test_divergence_raises(tiny_dataset):
    from dmdopt.training import Diverged

    with pytest.raises(Diverged):
        train(dataset=tiny_dataset, model=SMALL,
              training=TrainConfig(optimizer="sgd", lr=1e5, max_steps=50, eval_every=10))


@pytest.mark.parametrize(("field", "value"), [("lr", -1.0), ("optimizer", "lbfgs"), ("max_steps", 0),
                                              ("batch_size", 0), ("momentum", 1.5), ("device", "tpu"),
                                              ("device", "cuda:x"), ("device", "cuda: 0"),
                                              ("device", "cuda:-1"), ("seed", 2**64), ("seed", -1),
                                              ("target_error", math.inf),
                                              ("accept_rows", 0), ("accept_rows", 2.5)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(("kwargs", "needle"), [({"window": 2}, "window"), ({"window": 5, "rank": 4}, "rank"),
                                                ({"rank": -1}, "rank"), ({"rank": 1.5}, "rank"),
                                                ({"horizon": 0}, "horizon"), ({"horizon": "soon"}, "horizon"),
                                                ({"horizon": 10**400}, "horizon"),  # was OverflowError
                                                ({"grouping": "row"}, "grouping"),
                                                ({"growing": "grow"}, "growing"),
                                                ({"line_search": (1.0, math.inf)}, "line_search")])
def test_dmd_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DMDConfig(**kwargs)


def test_dmd_config_accepts_inf_and_numpy_numbers():
    assert math.isinf(DMDConfig(horizon="inf").horizon)
    assert DMDConfig.from_dict(DMDConfig(horizon=math.inf).to_dict()).horizon == math.inf
    # numpy numbers (a sweep over np.arange, values read from an array) are stored as Python
    # ones: the config equals, serialises and hashes as the one written by hand
    dmd = DMDConfig(window=np.int64(12), rank=np.int32(4), horizon=np.float32(5), warmup=np.int64(2))
    assert dmd == DMDConfig(window=12, rank=4, horizon=5.0, warmup=2)
    assert [type(v) for v in (dmd.window, dmd.rank, dmd.horizon, dmd.warmup)] == [int, int, float, int]
    assert type(DMDConfig(rank=np.float64(0.9)).rank) is float
    training = TrainConfig(lr=np.float64(1e-3), max_steps=np.int64(10), seed=np.uint8(3))
    assert training == TrainConfig(lr=1e-3, max_steps=10, seed=3)
    with pytest.raises(ValueError, match="dmd.rank must be an integer or a fraction"):
        DMDConfig(rank=np.bool_(True))
    # 0.0 is the optimal hard threshold, as `dmdopt.dmd` reads it (was: "an energy fraction
    # must be in (0, 1]")
    assert DMDConfig(rank=0.0) == DMDConfig(rank=0) and type(DMDConfig(rank=0.0).rank) is int


def test_mps_is_refused_with_the_reason():
    """Accepted before, then every run crashed on the first float64 tensor (the metrics)."""
    with pytest.raises(ValueError, match="mps.*float64"):
        TrainConfig(device="mps")


@pytest.mark.parametrize(("cut", "warmup"), [(23, 0), (20, 3)])
def test_resume_inside_a_window_is_bit_identical(tiny_dataset, tmp_path, cut, warmup):
    """Every other resume test stops at a window boundary, with no snapshots to carry over."""
    dmd = DMDConfig(window=5, rank=3, horizon=20.0, warmup=warmup)
    base = dict(max_steps=40, eval_every=10, batch_size=16, lr=3e-3, seed=1, device="cpu")
    straight = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(**base), dmd=dmd)
    ck = tmp_path / "run.pt"
    train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(**base | {"max_steps": cut}),
          dmd=dmd, checkpoint_path=ck, checkpoint_every=1000)
    assert torch.load(ck, weights_only=True)["accelerator"]["filled"] not in (0, 5)  # mid-window
    resumed = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(**base), dmd=dmd,
                    checkpoint_path=ck, checkpoint_every=1000)
    assert resumed.metrics == straight.metrics
    assert (resumed.jumps_accepted, resumed.jumps_rejected) == (straight.jumps_accepted, straight.jumps_rejected)
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_minibatch_closure_calls_are_billed_as_full_training_set_passes(tiny_dataset, monkeypatch):
    """The accept test runs over the whole training set: billed as n_train / batch forwards."""
    from dmdopt import DMDAccelerator

    calls = []
    real = DMDAccelerator._loss
    monkeypatch.setattr(DMDAccelerator, "_loss", lambda self, c: calls.append(1) or real(self, c))
    n_train = len(tiny_dataset.split("train")[0])
    result = train(dataset=tiny_dataset, model=SMALL, dmd=DMDConfig(window=5, rank=3, horizon=20.0),
                   training=TrainConfig(max_steps=40, eval_every=10, batch_size=8, device="cpu"))
    assert calls and result.cost["forward_passes"] == pytest.approx(len(calls) * n_train / 8)


def test_accept_rows_bill_a_subset_and_keep_the_batches_of_a_plain_run(tiny_dataset, monkeypatch):
    """`accept_rows`: the accept test sees a fixed subset, billed as rows / batch forwards; the
    subset comes from its own generator, so the mini-batches are those of the same run without
    it (the weights agree until the first jump)."""
    from dmdopt import DMDAccelerator

    seen = []
    real = DMDAccelerator._loss
    monkeypatch.setattr(DMDAccelerator, "_loss", lambda self, c: seen.append(1) or real(self, c))
    base = dict(max_steps=4, eval_every=2, batch_size=8, device="cpu")
    dmd = DMDConfig(window=5, rank=3, horizon=20.0)
    full = train(dataset=tiny_dataset, model=SMALL, dmd=dmd, training=TrainConfig(**base))
    sub = train(dataset=tiny_dataset, model=SMALL, dmd=dmd, training=TrainConfig(**base, accept_rows=6))
    assert [p["val_error"] for p in full.curve] == [p["val_error"] for p in sub.curve]  # no jump yet
    seen.clear()
    result = train(dataset=tiny_dataset, model=SMALL, dmd=dmd,
                   training=TrainConfig(**(base | {"max_steps": 40}), accept_rows=6))
    assert seen and result.cost["forward_passes"] == pytest.approx(len(seen) * 6 / 8)
    n_train = len(tiny_dataset.split("train")[0])
    seen.clear()
    everything = train(dataset=tiny_dataset, model=SMALL, dmd=dmd,  # more rows than there are
                       training=TrainConfig(**(base | {"max_steps": 10}), accept_rows=10**6))
    assert seen and everything.cost["forward_passes"] == pytest.approx(len(seen) * n_train / 8)
