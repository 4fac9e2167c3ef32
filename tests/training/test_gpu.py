"""CUDA runs (marked `gpu`; skipped without a device): training and DMD on the GPU agree with
the CPU, and snapshots stay on the device. They need torch, numpy, scipy and scikit-learn only
(no Optuna or MLflow), so `benchmarks/device_check.sh` runs them on a bare CUDA image."""

from __future__ import annotations

import pytest
import torch

from dmdopt import DMDConfig, ModelConfig, TrainConfig, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL = ModelConfig(width=32, depth=2)


def test_training_on_cuda_matches_cpu(tiny_dataset):
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(optimizer="adam", lr=0.01, max_steps=60, eval_every=20, device=device)
        runs[device] = train(dataset=tiny_dataset, model=SMALL, training=cfg,
                             dmd=DMDConfig(window=10, rank=4, horizon=20))
    assert runs["cuda"].device.startswith("cuda")
    # bpe cost is a count: identical on any device as long as the same jumps were kept
    if runs["cuda"].jumps_accepted == runs["cpu"].jumps_accepted:
        assert runs["cuda"].backprop_equivalent == pytest.approx(runs["cpu"].backprop_equivalent)
    assert runs["cuda"].val_error == pytest.approx(runs["cpu"].val_error, rel=0.05)


def test_accelerator_keeps_snapshots_on_the_device():
    from dmdopt import DMDAccelerator

    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=3, horizon=10))
    assert all(b.device.type == "cuda" for b in acc.buffers)
    x, y = torch.randn(128, 8, device="cuda"), torch.randn(128, 1, device="cuda")
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        acc.step(lambda: ((model(x) - y) ** 2).mean())
    assert acc.stats["jumps_accepted"] + acc.stats["jumps_rejected"] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("horizon", [10.0, float("inf")])
def test_snapshots_on_the_cpu_move_a_cuda_model(horizon):
    """snapshot_device='cpu' keeps the window in host memory: the fit runs there and each
    candidate's move is carried back to the model's device (finite and inf horizons)."""
    from dmdopt import DMDAccelerator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    acc = DMDAccelerator(model, opt, DMDConfig(window=5, rank=3, horizon=horizon,
                                               snapshot_device="cpu"))
    assert all(b.device.type == "cpu" for b in acc.buffers)
    x, y = torch.randn(128, 8, device="cuda"), torch.randn(128, 1, device="cuda")
    outcomes = []
    for _ in range(40):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        outcomes.append(acc.step(lambda: ((model(x) - y) ** 2).mean()))
    assert acc.stats["jumps_accepted"] >= 1, outcomes
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_resumes_on_cuda(tiny_dataset, tmp_path):
    """A CUDA run resumes from its checkpoint (the RNG states are loaded onto the CPU, where
    torch requires them) and ends where the uninterrupted run ends."""
    dmd = DMDConfig(window=5, rank=3, horizon=20)
    cfg = dict(optimizer="adam", lr=0.01, eval_every=10, batch_size=16, device="cuda")
    straight = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(max_steps=40, **cfg), dmd=dmd)
    ckpt = tmp_path / "run.pt"
    # cut inside a window (23 = 4 windows + 3 snapshots), so the snapshots travel too
    train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(max_steps=23, **cfg), dmd=dmd,
          checkpoint_path=ckpt, checkpoint_every=1000)
    assert torch.load(ckpt, weights_only=True)["accelerator"]["filled"] not in (0, 5)
    resumed = train(dataset=tiny_dataset, model=SMALL, training=TrainConfig(max_steps=40, **cfg),
                    dmd=dmd, checkpoint_path=ckpt, checkpoint_every=1000)
    assert resumed.device.startswith("cuda")
    assert [p["step"] for p in resumed.curve] == [p["step"] for p in straight.curve]
    assert (resumed.jumps_accepted, resumed.jumps_rejected) == (straight.jumps_accepted,
                                                                straight.jumps_rejected)
    # same device: production's same-device tolerance (bit-identical on the CPU)
    assert resumed.val_error == pytest.approx(straight.val_error, rel=1e-6)
