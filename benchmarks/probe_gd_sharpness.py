"""Probe: why DMD jumps give GD at its tuned learning rate only ~2x (the edge of stability).

Runs plain GD and GD + DMD (default `DMDConfig`) on the default problem, one seed, and measures
the sharpness (largest Hessian eigenvalue of the full-batch training loss, by power iteration
on Hessian-vector products) against GD's stability limit 2 / lr:
  * plain GD: every `window` steps;
  * GD + DMD: at each window's end before the jump, at the jumped-to weights, and the largest
    training loss of the window that follows (a rise there is the catapult that gives back the
    jump's gain).

Diagnostic only: the probe's forward passes and Hessian-vector products are not charged to
the training cost, and it is slow (about 3 min for 400 steps on 2 CPU cores).

    python benchmarks/probe_gd_sharpness.py [--lr 8] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import torch


def sharpness(model: torch.nn.Module, closure, iters: int = 20) -> float:
    """Largest Hessian eigenvalue of the closure's loss, by `iters` power iterations."""
    loss_fn = getattr(closure, "__wrapped__", closure)  # the loop's closure is no_grad-wrapped
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
    value = 0.0
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        for _ in range(iters):
            norm = math.sqrt(sum(float((t * t).sum()) for t in v))
            v = [t / norm for t in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            value = sum(float((a * b).sum()) for a, b in zip(hv, v, strict=True))
            v = [t.detach() for t in hv]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import dmdopt.training.accelerator as accelerator_module
    from dmdopt.bench import _configs, _dataset, _problem
    from dmdopt.training.config import DMDConfig
    from dmdopt.training.loop import train

    base = accelerator_module.DMDAccelerator
    events: list[dict] = []

    class PlainProbe(base):
        """No jumps: the sharpness of plain GD every `window` steps."""

        def step(self, closure):
            self.steps_seen += 1
            if self.steps_seen % self.config.window == 0:
                events.append({"step": self.steps_seen, "loss": float(closure()),
                               "sharp": sharpness(self.model, closure)})
            return None

    class JumpProbe(base):
        """The accelerator itself, with the sharpness before and after every jump."""

        def step(self, closure):
            with torch.no_grad():
                loss = float(closure())
            if events and "next_max" in events[-1]:
                events[-1]["next_max"] = max(events[-1]["next_max"], loss)
            if self.filled == self.config.window - 1:
                before = sharpness(self.model, closure)
            kept = super().step(closure)
            if kept is not None:
                event = {"step": self.steps_seen, "loss": loss, "sharp": before, "kept": kept}
                if kept:
                    event.update(after_loss=float(closure()), after_sharp=sharpness(self.model, closure),
                                 horizon=self.stats["chosen_horizons"][-1], next_max=-math.inf)
                events.append(event)
            return kept

    dataset = _dataset(False, "dmdopt-runs/data")
    model = _problem(False)[1]
    training = _configs("gd", lr=args.lr, steps=args.steps, seed=args.seed)
    limit = 2.0 / args.lr
    for name, probe in (("plain GD", PlainProbe), ("GD + DMD", JumpProbe)):
        events.clear()
        accelerator_module.DMDAccelerator = probe
        try:
            train(dataset=dataset, model=model, training=training, dmd=DMDConfig())
        finally:
            accelerator_module.DMDAccelerator = base
        print(f"\n{name}, lr {args.lr:g} (stability limit 2/lr = {limit:.3f}), seed {args.seed}")
        if probe is PlainProbe:
            print(f"{'step':>5s} {'loss':>8s} {'sharp':>7s}")
            for e in events:
                print(f"{e['step']:5d} {e['loss']:8.4f} {e['sharp']:7.3f}")
            continue
        print(f"{'step':>5s} {'loss':>8s} {'sharp':>7s} | {'jump':6s} {'loss':>8s} {'sharp':>7s} "
              f"{'h':>6s} | next window's max loss")
        for e in events:
            if not e["kept"]:
                print(f"{e['step']:5d} {e['loss']:8.4f} {e['sharp']:7.3f} | rejected")
                continue
            nxt = e["next_max"]
            print(f"{e['step']:5d} {e['loss']:8.4f} {e['sharp']:7.3f} | kept   {e['after_loss']:8.4f} "
                  f"{e['after_sharp']:7.3f} {e['horizon']:6g} | {'-' if nxt == -math.inf else f'{nxt:.4f}'}")


if __name__ == "__main__":  # the dataset build spawns workers
    main()
