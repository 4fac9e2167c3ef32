"""DMDAccelerator: generic models, exact rollback, NaN safety, grouping, cost, state, train()."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dmdopt.training.accelerator import DMDAccelerator, group_parameters
from dmdopt.training.config import DMDConfig, TrainConfig
from dmdopt.training.cost import CostCounter


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


def _cnn_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1, 8, 8, generator=gen)
    y = x.mean(dim=(1, 2, 3)).unsqueeze(1) * 3.0 + 0.5
    torch.manual_seed(seed)
    return _CNN(), x, y


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_accelerates_a_cnn_and_never_increases_the_loss():
    model, x, y = _cnn_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=8, rank=0.99, horizon=8,
                                               line_search=(1.0, 4.0, 16.0)))

    def closure():
        return ((model(x) - y) ** 2).mean()

    with torch.no_grad():
        start = float(closure())
    outcomes = []
    for _ in range(48):
        opt.zero_grad()
        closure().backward()
        opt.step()
        with torch.no_grad():
            before = float(closure())
        outcome = acc.step(closure)
        with torch.no_grad():
            after = float(closure())
        if outcome is not None:
            outcomes.append(outcome)
            assert after <= before  # a kept jump improves, a rejected one changes nothing
        else:
            assert after == before
    assert len(outcomes) == 6
    assert acc.stats["jumps_accepted"] >= 1
    with torch.no_grad():
        assert float(closure()) < start


def test_a_step_inside_autocast_makes_the_same_jumps_as_outside():
    # the closure may run under the caller's autocast; the DMD maths never does (it kept no
    # jump when its Gram ran in bfloat16)
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = torch.sin(x.sum(1, keepdim=True))

    def run(autocast: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        acc = DMDAccelerator(net, opt, DMDConfig(window=20))
        for _ in range(100):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                acc.step(lambda: nn.functional.mse_loss(net(x).float(), y))
        return acc.stats["jumps_accepted"], acc.stats["chosen_horizons"]

    outside = run(False)
    assert outside[0] >= 3
    assert run(True)[0] >= outside[0] - 1  # the closure's own bf16 rounding may flip one


def test_rejected_jump_leaves_weights_bit_identical():
    model, x, y = _cnn_problem(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=3, horizon=10,
                                               line_search=(0.5, 1.0, 2.0)))
    calls = iter(range(10_000))

    def increasing():  # every evaluation is worse than the one before: nothing can be kept
        return torch.tensor(float(next(calls)))

    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        assert acc.step(increasing) is None
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    before = _params(model)
    assert acc.step(increasing) is False
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), q)
    assert acc.stats["jumps_rejected"] == 1 and acc.stats["jumps_accepted"] == 0


def test_nan_snapshots_never_reach_the_weights():
    model, x, y = _cnn_problem(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = DMDAccelerator(model, opt, DMDConfig(window=4, rank=2, horizon=5))

    def closure():
        return ((model(x) - y) ** 2).mean()

    for k in range(4):
        opt.zero_grad()
        closure().backward()
        opt.step()
        if k == 3:
            acc.buffers[0][0, 1] = float("nan")  # a corrupted snapshot inside the window
        before = _params(model)
        acc.step(closure)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), q)
    assert acc.stats["jumps_rejected"] == 1


@pytest.mark.parametrize(("grouping", "expected"), [
    ("layer", [["conv.weight", "conv.bias"], ["head.weight", "head.bias"]]),
    ("tensor", [["conv.weight"], ["conv.bias"], ["head.weight"], ["head.bias"]]),
    ("global", [["conv.weight", "conv.bias", "head.weight", "head.bias"]]),
])
def test_grouping(grouping, expected):
    model, _, _ = _cnn_problem()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = group_parameters(model, grouping)
    assert [[names[id(p)] for p in g] for g in groups] == expected


def test_frozen_parameters_are_not_grouped():
    model, _, _ = _cnn_problem()
    model.conv.bias.requires_grad_(False)
    groups = group_parameters(model, "layer")
    assert [len(g) for g in groups] == [1, 2]


def test_a_lazy_model_is_accepted_before_its_first_forward():
    # the optimiser accepts uninitialised parameters; the accelerator raised torch's
    # "uninitialized parameter" error when built before the first forward
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.Tanh(), nn.LazyLinear(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    kept = []
    for _ in range(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        kept.append(acc.step(lambda: ((model(x) - y) ** 2).mean()))
    assert acc.sizes == [4 * 16 + 16, 16 + 1]  # laid out on the materialised parameters
    assert kept.count(None) == 16 and acc.stats["jumps_accepted"] >= 1


def test_a_fully_frozen_model_makes_no_window_and_counts_no_jump():
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    acc = DMDAccelerator(model, opt, DMDConfig(window=3))
    assert all(acc.step(lambda: torch.tensor(1.0)) is None for _ in range(7))
    assert acc.stats["jumps_rejected"] == acc.stats["jumps_accepted"] == 0
    model.weight.requires_grad_(True)  # unfrozen: a window starts on it
    assert [acc.step(lambda: model.weight.sum()) for _ in range(3)][-1] is not None


@pytest.mark.parametrize(("dtype", "nbytes"), [("float32", 4), ("float64", 8), ("bfloat16", 2)])
def test_snapshot_bytes(dtype, nbytes):
    model, _, _ = _cnn_problem()
    n = sum(p.numel() for p in model.parameters())
    acc = DMDAccelerator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         DMDConfig(window=7, rank=3, snapshot_dtype=dtype))
    assert acc.snapshot_bytes == 7 * n * nbytes


def test_costs_are_counted():
    from dmdopt.dmd import dmd_flops, fit_dmd

    model, x, y = _cnn_problem(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cost = CostCounter(flops_per_backprop=1e6)
    factors = (0.25, 1.0, 4.0)
    acc = DMDAccelerator(model, opt, DMDConfig(window=6, rank=3, horizon=6, line_search=factors),
                         cost=cost, forward_weight=2.0)
    calls = []

    def closure():
        calls.append(1)
        return ((model(x) - y) ** 2).mean()

    for _ in range(6):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        acc.step(closure)
    n_calls = len(calls)
    assert 2 <= n_calls <= 1 + len(factors)  # base loss + the candidates tried
    assert acc.stats["forward_passes"] == n_calls
    assert cost.forward_passes == pytest.approx(2.0 * n_calls)
    # exactly: one fit per group, plus 2pr + p per group for each candidate after the first
    # (the window's snapshots are still in the buffers, so the fits can be redone here)
    fits = [(b.shape[1], fit_dmd(b.T, rank=3)) for b in acc.buffers]
    fit_flops = sum(dmd_flops(p, 6, f.rank, gram_passes=f.gram_passes) for p, f in fits)
    extra = (n_calls - 2) * sum(2 * p * f.rank + p for p, f in fits)
    assert fit_flops > 0
    assert cost.dmd_flops == fit_flops + extra
    assert cost.dmd_flops == acc.stats["dmd_flops"]
    assert cost.backprop_equivalent == pytest.approx(2.0 * n_calls / 3 + cost.dmd_flops / 1e6)


def test_a_gram_redone_in_float64_is_charged_twice():
    """An integer cap can keep a direction below the float32 Gram's floor: the Gram is then
    formed again in float64 (pod.rows_gram), and that second p-sized product is DMD cost."""
    from dmdopt.dmd import dmd_flops, fit_dmd

    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    a, b = 0.9 * a / torch.linalg.matrix_norm(a, 2), torch.randn(6, dtype=torch.float64)
    embed, state, cols = torch.randn(300, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), []
    for _ in range(20):  # a 6-dimensional affine system seen through 300 float32 numbers
        cols.append(embed @ state)
        state = a @ state + b
    snapshots = torch.stack(cols, 1).float()
    assert fit_dmd(snapshots, rank=18).gram_passes == 2
    assert fit_dmd(snapshots, rank=0.99).gram_passes == 1
    assert fit_dmd(snapshots.double(), rank=18).gram_passes == 1  # float64: one exact pass
    one, two = dmd_flops(300, 20, 6), dmd_flops(300, 20, 6, gram_passes=2)
    assert two - one == 2 * 300 * 19 ** 2

    # the accelerator charges what the fit did: a linear "model" whose weights follow that path
    model = nn.Linear(300, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cost = CostCounter(flops_per_backprop=1e6)
    acc = DMDAccelerator(model, opt, DMDConfig(window=20, rank=18, horizon=5, line_search=()),
                         cost=cost)
    for k in range(20):
        with torch.no_grad():
            model.weight.copy_(snapshots[:, k])
        acc.step(lambda: torch.zeros(()))
    fit = fit_dmd(snapshots, rank=18)
    assert cost.dmd_flops == dmd_flops(300, 20, fit.rank, gram_passes=2)


def _batchnorm_problem():
    """(model, x, y, optimizer, accelerator): an MLP with a BatchNorm layer, window 5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, x, y, opt, DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))


def test_the_accept_test_leaves_buffers_as_the_kept_weights_would():
    """A closure run in train mode updates BatchNorm's running statistics once per candidate.
    A rejected jump leaves them as they were; a kept one as after one train-mode forward at
    the kept weights from the statistics before the test (they used to be put back too, which
    left the jumped weights with the statistics of the weights they replaced)."""
    import copy

    model, x, y, opt, acc = _batchnorm_problem()
    outcomes = []
    for make_worse in (True, False):
        for _ in range(5):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()  # train mode: updates the running stats
            opt.step()
            before = {n: b.clone() for n, b in model.named_buffers()}

            calls = []

            def closure(calls=calls, make_worse=make_worse):
                loss = ((model(x) - y) ** 2).mean()  # train mode, as in the README's example
                calls.append(1)
                return loss + 1e3 if make_worse and len(calls) > 1 else loss  # candidates worse

            outcome = acc.step(closure)
        outcomes.append(outcome)
        assert len(calls) >= 2 + (not make_worse)  # base, then candidates, in train mode
        expected = before
        if outcome:  # one forward at the kept weights, from the statistics before the test
            replay = copy.deepcopy(model)
            for name, buf in replay.named_buffers():
                buf.copy_(before[name])
            with torch.no_grad():
                replay(x)
            expected = dict(replay.named_buffers())
            assert not torch.equal(expected["1.running_mean"], before["1.running_mean"])
        for name, buf in model.named_buffers():
            assert torch.equal(buf, expected[name]), name
    assert outcomes == [False, True]


def test_state_dict_round_trip():
    model, x, y = _cnn_problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    for _ in range(7):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        acc.step(lambda: ((model(x) - y) ** 2).mean())
    state = acc.state_dict()
    other = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    other.load_state_dict(state)
    assert other.filled == acc.filled == 2 and other.steps_seen == acc.steps_seen == 7
    assert [b.shape[0] for b in state["buffers"]] == [2, 2]  # the filled rows only
    for a, b in zip(other.buffers, acc.buffers, strict=True):
        assert torch.equal(a[:2], b[:2])
    assert other.stats == acc.stats
    # a save of every row (before 2026-12-07) still loads; another window length does not
    full = {**state, "buffers": [b.clone() for b in acc.buffers]}
    del full["window"]
    again = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    again.load_state_dict(full)
    assert all(torch.equal(a[:2], b[:2]) for a, b in zip(again.buffers, acc.buffers, strict=True))
    longer = DMDAccelerator(model, opt, DMDConfig(window=6, rank=2, horizon=5))
    with pytest.raises(ValueError, match="saved window holds"):
        longer.load_state_dict(state)
    acc.buffers[0].zero_()  # the saved state is a copy
    assert not torch.equal(other.buffers[0], acc.buffers[0])
    horizons = list(state["stats"]["chosen_horizons"])
    for _ in range(10):  # two more windows: neither the saved state nor `other` sees them
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        acc.step(lambda: ((model(x) - y) ** 2).mean())
    assert acc.stats["jumps_accepted"] + acc.stats["jumps_rejected"] == 3
    assert state["stats"]["chosen_horizons"] == horizons == other.stats["chosen_horizons"]


def _resume_case(freeze: bool):
    """A CNN trained 7 steps (window 5), with or without its conv layer frozen before the
    first, then its accelerator's state: what a checkpoint of a run holds."""
    model, x, y = _cnn_problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    for step in range(7):
        if freeze and step == 0:
            model.conv.requires_grad_(False)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        acc.step(lambda: ((model(x) - y) ** 2).mean())
    return model, opt, acc, x, y


@pytest.mark.parametrize("freeze", [False, True])
def test_a_resumed_window_follows_parameters_loaded_or_frozen_since_construction(freeze):
    """Resume as a training script does: build the model and accelerator, load the weights
    with `assign=True` (or freeze the layer the run had frozen), then load the accelerator's
    state. Its saved window must carry on (the next jump at the same step as the original run's,
    landing on the same weights), not restart, and not raise on the frozen layer's groups."""
    model, opt, acc, x, y = _resume_case(freeze)
    weights, acc_state = model.state_dict(), acc.state_dict()

    resumed, _, _ = _cnn_problem(4)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_acc = DMDAccelerator(resumed, resumed_opt, DMDConfig(window=5, rank=2, horizon=5))
    resumed.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    if freeze:
        resumed.conv.requires_grad_(False)
    resumed_opt = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05)
    resumed_acc.optimizer = resumed_opt
    resumed_acc.load_state_dict(acc_state)
    assert len(resumed_acc.buffers) == len(acc.buffers) == (1 if freeze else 2)

    outcomes = {}
    for name, (m, o, a) in {"original": (model, opt, acc),
                            "resumed": (resumed, resumed_opt, resumed_acc)}.items():
        outcomes[name] = []
        for _ in range(3):  # steps 8-10: the window of steps 6-10 ends with a jump
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            outcomes[name].append(a.step(lambda m=m: ((m(x) - y) ** 2).mean()))
    assert outcomes["resumed"] == outcomes["original"]
    assert outcomes["original"][:2] == [None, None] and outcomes["original"][2] is not None
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_a_state_saved_after_a_layer_was_frozen_mid_window_resumes_as_the_run_goes_on():
    """Freeze a layer at an epoch's end, then checkpoint: the state held the window of the
    parameters before the freeze, and the model rebuilt as saved (layer frozen) refused it.
    Saved now as the next step would see it (an empty window on the live parameters), it
    loads, and the resumed run lands on the uninterrupted run's weights."""
    def run(model, opt, acc, steps, x, y):
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            acc.step(lambda: ((model(x) - y) ** 2).mean())

    cfg = DMDConfig(window=5, rank=2, horizon=5)
    model, x, y = _cnn_problem(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, cfg)
    run(model, opt, acc, 7, x, y)  # mid-window
    model.conv.requires_grad_(False)
    weights, acc_state = model.state_dict(), acc.state_dict()
    assert acc_state["filled"] == 0 and len(acc_state["buffers"]) == 1

    resumed, _, _ = _cnn_problem(4)
    resumed.conv.requires_grad_(False)
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    resumed_acc = DMDAccelerator(resumed, resumed_opt, cfg)
    resumed.load_state_dict(weights)
    resumed_acc.load_state_dict(acc_state)
    run(model, opt, acc, 6, x, y)
    run(resumed, resumed_opt, resumed_acc, 6, x, y)
    counts = ("jumps_accepted", "jumps_rejected", "forward_passes", "dmd_flops", "chosen_horizons")
    assert [acc.stats[k] for k in counts] == [resumed_acc.stats[k] for k in counts]
    assert acc.stats["jumps_accepted"] + acc.stats["jumps_rejected"] == 2
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach())


class _GrowingCache(nn.Module):
    """A cache re-registered at a longer input's size, as positional caches are: the closure's
    batch (128 rows) is longer than the training batch (32)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 8), nn.Linear(8, 1)
        self.register_buffer("pos", torch.ones(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.pos.shape[0]:
            self.register_buffer("pos", torch.ones(x.shape[0]), persistent=False)
        return self.out(torch.tanh(self.hidden(x))) * self.pos[: x.shape[0], None]


def test_a_buffer_the_closure_resizes_is_put_back_by_name():
    """Buffers were put back by position with copy_: a closure that re-registered one at
    another size made the restore raise, and that raise skipped the weights' rollback (the
    model was left on an untested candidate)."""
    gen = torch.Generator().manual_seed(0)
    x_train, x_val = torch.randn(32, 4, generator=gen), torch.randn(128, 4, generator=gen)
    y_train, y_val = x_train.sum(1, keepdim=True).tanh(), x_val.sum(1, keepdim=True).tanh()
    torch.manual_seed(0)
    model = _GrowingCache()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    outcomes = []
    for _ in range(10):
        opt.zero_grad()
        ((model(x_train) - y_train) ** 2).mean().backward()
        opt.step()
        before, pos = _params(model), model.pos.clone()
        outcome = acc.step(lambda: ((model(x_val) - y_val) ** 2).mean())
        outcomes.append(outcome)
        if outcome is False:  # weights and buffers as before the test
            assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before, strict=True))
            assert torch.equal(model.pos, pos)
        elif outcome:
            assert model.pos.shape == (128,)  # as the kept candidate's closure call left it
    assert outcomes[4] is not None and outcomes[9] is not None


def test_a_complex_parameter_is_extrapolated_in_both_parts():
    """A complex parameter (spectral layers) was copied into the real snapshot buffer, which
    dropped its imaginary part (with a warning): a kept jump moved the real part only. GD on
    a complex least-squares problem is affine in (real, imag): horizon inf lands on its
    solution."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, dtype=torch.cfloat, generator=gen)
    solution = torch.randn(4, 1, dtype=torch.cfloat, generator=gen)
    y = x @ solution
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(4, 1, dtype=torch.cfloat))
    opt = torch.optim.SGD([model.w], lr=0.2)
    acc = DMDAccelerator(model, opt, DMDConfig(window=12, rank=10, horizon=math.inf,
                                               snapshot_dtype="float64"))

    def loss():
        return ((x @ model.w - y).abs() ** 2).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Casting complex values to real discards ..."
        for _ in range(12):
            opt.zero_grad()
            loss().backward()
            opt.step()
            outcome = acc.step(loss)
    assert outcome is True
    assert acc.snapshot_bytes == 12 * 8 * 8  # 4 complex coordinates = 8 real ones
    error = (model.w.detach() - solution).abs().max() / solution.abs().max()
    assert float(error) < 1e-5, float(error)  # float32 weights (complex64)


def test_a_window_saved_for_other_parameters_is_refused_in_one_line():
    _, _, acc, _, _ = _resume_case(freeze=True)  # one group: the head
    model, x, y = _cnn_problem(4)  # nothing frozen: two groups
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    other = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    for _ in range(2):  # a window of its own under way
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        other.step(lambda: ((model(x) - y) ** 2).mean())
    # only the filled rows hold snapshots: the rows after them are uninitialised memory
    # (torch.empty), which may hold NaN and never equals itself
    before = [b[:2].clone() for b in other.buffers]
    with pytest.raises(ValueError, match=r"saved window holds 1 groups .* give 2") as err:
        other.load_state_dict(acc.state_dict())
    assert "\n" not in str(err.value)
    assert other.filled == 2 and other.steps_seen == 2  # nothing half-loaded
    assert all(torch.equal(a[:2], b) for a, b in zip(other.buffers, before, strict=True))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_snapshots_round_the_move_not_the_weights(dtype):
    """With half-precision snapshots a kept jump moves the float32 weights by the DMD
    displacement; it must not replace them by their half-precision rounding."""
    model, x, y = _cnn_problem(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5, snapshot_dtype=dtype))
    losses = iter([1.0] + [0.5] * 100)  # base loss 1, every candidate 0.5: the first is kept
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        before = _params(model)
        kept = acc.step(lambda: torch.tensor(next(losses)))
    assert kept is True
    half = getattr(torch, dtype)
    for p, b in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, p.to(half).float())  # not rounded to the snapshots' dtype
        assert float((p.detach() - b).abs().max()) < 0.1  # moved by a DMD step, not blown away


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_optimizer_state_policy_after_a_kept_jump(policy):
    model, x, y = _cnn_problem(5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5, optimizer_state=policy))
    losses = iter([10.0, 1.0] + [5.0] * 100)  # base loss 10, the first candidate 1: kept

    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        assert len(opt.state) > 0
        outcome = acc.step(lambda: torch.tensor(next(losses)))
    assert outcome is True
    assert (len(opt.state) == 0) == (policy == "reset")


def test_warmup_skips_the_first_steps():
    model, x, y = _cnn_problem(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=3, rank=1, horizon=3, warmup=4))
    outcomes = []
    for _ in range(7):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        outcomes.append(acc.step(lambda: ((model(x) - y) ** 2).mean()))
    assert outcomes[:6] == [None] * 6 and outcomes[6] is not None


class _TinyDataset:
    """The `Dataset.split` interface, in memory."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.x = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
        w = rng.normal(size=(6, 16)).astype(np.float32)
        self.y = np.tanh(self.x @ w).astype(np.float32) + 1.0

    def split(self, name: str):
        sl = {"train": slice(0, 32), "val": slice(32, 40), "test": slice(40, 48)}[name]
        return self.x[sl], self.y[sl]


def test_train_with_dmd_counts_jumps_and_cost():
    from dmdopt.model import ModelConfig
    from dmdopt.training.loop import train

    result = train(dataset=_TinyDataset(), model=ModelConfig(width=16, depth=1),
                   training=TrainConfig(optimizer="sgd", lr=0.2, max_steps=40, eval_every=10,
                                        device="cpu"),
                   dmd=DMDConfig(window=10, rank=0.99, horizon=10))
    assert result.jumps_accepted + result.jumps_rejected == 4
    assert result.cost["backprop_steps"] == 40
    assert result.cost["forward_passes"] >= 4 * 2
    assert result.backprop_equivalent > result.cost["backprop_steps"]
    assert math.isfinite(result.val_error)
    assert result.dmd_time > 0


def test_tied_losses_do_not_stop_the_line_search_before_a_farther_improvement():
    """Candidates whose float32 losses tie (a plateau far above zero) come before one that
    improves: counting a tie as a rise rejected such jumps (a review's case)."""
    w = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.w = w
    acc = DMDAccelerator(model, torch.optim.SGD([w], lr=0.0), DMDConfig(window=6, rank=2, horizon=1))
    losses = iter([1.0, 1.0, 1.0, 0.5, 0.6, 0.7, 0.8, 0.9])  # base, then the ladder

    def plateau():
        return torch.tensor(next(losses))

    for k in range(6):
        with torch.no_grad():
            w.fill_(1 - 0.8 ** (k + 1))
        result = acc.step(plateau)
    assert result is True and acc.stats["forward_passes"] == 5  # base, 2 ties, best, a rise


@pytest.mark.parametrize(("target", "forwards", "kept"), [
    (0.0, 1 + 2, False),  # every step along the ladder is worse: stop at the second rise
    (1.0, 1 + 7, True),   # better and better up to the fixed point: the whole ladder is tried
    (0.95, None, True),   # a minimum inside the ladder: stop at the first rise after it
    # a closure that is never finite: each NaN counts as a rise (it ran all 8 forward passes)
    (math.nan, 1 + 2, False),
])
def test_line_search_stops_where_the_ladder_loss_rises(target, forwards, kept):
    # Snapshots of x_k = 1 - 0.8^k (affine, fixed point 1); the closure's loss is (x - target)^2.
    w = nn.Parameter(torch.zeros(1))
    model = nn.Module()
    model.w = w
    acc = DMDAccelerator(model, torch.optim.SGD([w], lr=0.0), DMDConfig(window=6, rank=2, horizon=1))
    losses = []

    def closure():
        losses.append(float((w.detach() - target) ** 2))
        return torch.tensor(losses[-1])

    for k in range(6):
        with torch.no_grad():
            w.fill_(1 - 0.8 ** (k + 1))
        result = acc.step(closure)
    assert result is kept
    ladder = losses[1:]
    if forwards is not None:
        assert len(losses) == forwards
    else:  # past the best candidate exactly one worse one was tried
        best = ladder.index(min(ladder))
        assert len(ladder) == best + 2 and ladder[-1] > ladder[-2]
    now = float(w.detach())
    if kept:
        assert (now - target) ** 2 == pytest.approx(min(losses), rel=1e-6) and min(losses) < losses[0]
    else:  # rolled back bit for bit
        assert now == torch.tensor(1 - 0.8 ** 6, dtype=torch.float32).item()


def test_growing_auto_follows_growing_modes_under_sgd_only():
    from dmdopt.training.accelerator import resolve_growing

    model = nn.Linear(3, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters())
    assert DMDAccelerator(model, sgd, DMDConfig()).growing == "drift"
    assert DMDAccelerator(model, adam, DMDConfig()).growing == "drop"
    assert resolve_growing("auto", torch.optim.RMSprop(model.parameters())) == "drop"
    for policy in ("drop", "drift"):  # an explicit policy is kept whatever the optimiser
        assert DMDAccelerator(model, adam, DMDConfig(growing=policy)).growing == policy


def _affine_accelerator(config, optimizer_cls=torch.optim.SGD):
    w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model = nn.Module()
    model.w = w
    return w, DMDAccelerator(model, optimizer_cls([w], lr=0.0), config)


@pytest.mark.parametrize(("target", "factor"), [(1.0, 1.0), (0.87, 0.5)])
def test_inf_horizon_jumps_to_the_fixed_point_or_a_damped_step(target, factor):
    # x_k = 1 - 0.8^k: affine, fixed point 1. Candidates: now + f (1 - now), f in the ladder.
    w, acc = _affine_accelerator(DMDConfig(window=6, rank=2, horizon="inf", line_search=(0.25, 0.5, 1.0),
                                               snapshot_dtype="float64"))
    closure = lambda: (w.detach() - target).pow(2).sum()  # noqa: E731
    for k in range(6):
        with torch.no_grad():
            w.fill_(1 - 0.8 ** (k + 1))
        kept = acc.step(closure)
    now = 1 - 0.8 ** 6
    assert kept is True
    assert float(w.detach()) == pytest.approx(now + factor * (1 - now), abs=1e-9)
    assert acc.stats["chosen_horizons"] == [math.inf if factor == 1.0 else factor]


@pytest.mark.parametrize(("opt", "kept"), [(torch.optim.SGD, True), (torch.optim.Adam, False)])
def test_growing_auto_follows_a_growing_mode_under_sgd_only(opt, kept):
    # x_k = 1.1^k (one growing mode): 'drift' continues at the last step length, 'drop' stays.
    w, acc = _affine_accelerator(DMDConfig(window=6, rank=1, horizon=4.0, line_search=(1.0,),
                                               snapshot_dtype="float64"), opt)
    xs = [1.1 ** k for k in range(6)]
    goal = xs[-1] + 4 * (xs[-1] - xs[-2])
    closure = lambda: (w.detach() - goal).pow(2).sum()  # noqa: E731
    for x in xs:
        with torch.no_grad():
            w.fill_(x)
        out = acc.step(closure)
    assert out is kept
    assert float(w.detach()) == pytest.approx(goal if kept else xs[-1], rel=1e-9)
    # 'drop' leaves nothing to extrapolate: every candidate would be the current weights, and
    # each was evaluated anyway (one forward per rung, charged)
    assert acc.stats["forward_passes"] == (2 if kept else 0)



def test_a_jump_that_moves_nothing_spends_no_forward_pass():
    """horizon=inf with only a neutral mode (lambda = 1: a constant drift) has no converged
    state; the ladder's four candidates were all the current weights, 5 forwards charged."""
    w, acc = _affine_accelerator(DMDConfig(window=6, rank=1, horizon="inf",
                                           line_search=(0.25, 0.5, 0.75, 1.0),
                                           snapshot_dtype="float64"))
    cost = acc.cost = CostCounter(flops_per_backprop=1.0)
    for k in range(6):
        with torch.no_grad():
            w.fill_(0.5 * k)  # x_{k+1} = x_k + 0.5
        out = acc.step(lambda: w.detach().pow(2).sum())
    assert out is False and float(w.detach()) == 2.5
    assert acc.stats["forward_passes"] == 0 and cost.forward_passes == 0


def test_every_closure_call_of_a_jump_sees_the_same_random_numbers():
    """A dropout closure drew new masks per candidate (the test compared noise), and the
    caller's RNG was left advanced by the test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=2, horizon=5))
    draws = []

    def closure():
        draws.append(torch.rand(3))  # what a dropout layer draws
        return ((model(x) - y) ** 2).mean()

    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        state = torch.get_rng_state()
        acc.step(closure)
    assert len(draws) >= 2 and all(torch.equal(d, draws[0]) for d in draws)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched


def test_an_error_in_the_closure_rolls_the_jump_back():
    """The weights were left on the candidate under test, and the buffers as it set them."""
    model, x, y, opt, acc = _batchnorm_problem()
    calls = []

    def closure():
        calls.append(1)
        loss = ((model(x) - y) ** 2).mean()  # train mode: moves the running statistics
        if len(calls) == 2:  # on the first candidate
            raise KeyboardInterrupt
        return loss

    for step in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if step == 4:
            weights = _params(model)
            buffers = [b.clone() for b in model.buffers()]
            with pytest.raises(KeyboardInterrupt):
                acc.step(closure)
        else:
            acc.step(closure)
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))


@pytest.mark.parametrize("change", ["assign", "add"])
def test_parameters_replaced_after_construction_are_followed(change):
    """The accelerator held the tensors it was built with: after `load_state_dict(assign=True)`
    it recorded (and jumped) tensors that were no longer the model's, silently. Now the window
    restarts on the model's parameters as they are, and the jump lands on them."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(1))
    acc = DMDAccelerator(model, torch.optim.SGD([model.w], lr=0.0),
                         DMDConfig(window=6, rank=2, horizon=1))
    k = 0

    def advance():  # x_k = 1 - 0.8^k: affine, fixed point 1; loss (x - 1)^2
        nonlocal k
        k += 1
        with torch.no_grad():
            model.w.fill_(1 - 0.8 ** k)
        return acc.step(lambda: ((model.w.detach() - 1.0) ** 2).sum())

    for _ in range(3):
        assert advance() is None
    old = model.w
    if change == "assign":
        model.load_state_dict({"w": old.detach().clone()}, assign=True)
    else:  # a new trainable tensor beside w
        model.extra = nn.Parameter(torch.zeros(2))
    assert change != "assign" or model.w is not old
    outcomes = [advance() for _ in range(6)]
    assert outcomes == [None] * 5 + [True]  # a fresh window of 6 on the new parameters
    assert abs(float(model.w.detach()) - 1.0) < 1e-4  # the jump reached the fixed point of the live w


def test_a_float64_model_under_float32_snapshots_is_warned_of():
    """The float32 default rounds a float64 model's small steps away before the fit (DMD then
    silently does nothing); float64 snapshots, or a float32 model, are not warned of."""
    model = nn.Linear(3, 1).double()
    with pytest.warns(UserWarning, match="snapshot_dtype='float64' keeps them"):
        DMDAccelerator(model, torch.optim.SGD(model.parameters(), lr=0.1), DMDConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DMDAccelerator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       DMDConfig(snapshot_dtype="float64"))
        single = nn.Linear(3, 1)
        DMDAccelerator(single, torch.optim.SGD(single.parameters(), lr=0.1), DMDConfig())


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn

def worker(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    from dmdopt.training import DMDAccelerator, DMDConfig
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    xs, ys = x[rank::world], y[rank::world]  # this rank's shard, as DistributedSampler gives
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = DMDAccelerator(model, opt, DMDConfig(window=10))
    # torch.compile(DDP) is seen through (not compiled here: built only, never called)
    assert DMDAccelerator(torch.compile(model), opt, DMDConfig())._sync_group is model.process_group
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        acc.step(lambda: nn.functional.mse_loss(model(xs[:32]), ys[:32]))
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.save({"flat": flat, "stats": acc.stats}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_ddp_ranks_keep_the_same_jumps_and_equal_weights(tmp_path):
    # each rank scores candidates on its own shard; their verdicts must agree, else the
    # weight copies drift apart (DDP never re-syncs weights)
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), f"file://{tmp_path / 'rendezvous'}",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["stats"]["jumps_accepted"] >= 3
    assert ranks[0]["stats"]["chosen_horizons"] == ranks[1]["stats"]["chosen_horizons"]
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])


def test_a_config_that_is_not_a_dmdconfig_and_a_bad_forward_weight_are_named():
    """A dict failed at the first step as "'dict' object has no attribute 'growing'"; a
    negative or NaN forward_weight made the cost negative or NaN without a word."""
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"config must be a DMDConfig, got dict"):
        DMDAccelerator(model, opt, {"window": 10})
    for bad in (-3, 0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"forward_weight must be a finite number > 0"):
            DMDAccelerator(model, opt, DMDConfig(), forward_weight=bad)
    assert DMDAccelerator(model, opt, DMDConfig(), forward_weight=np.float32(2)).forward_weight == 2.0
