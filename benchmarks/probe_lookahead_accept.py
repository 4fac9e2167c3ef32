"""Probe: a sharpness-aware accept test for GD + DMD at its tuned learning rate.

At lr 8 plain GD sits at the edge of stability (`probe_gd_sharpness.py`): a kept jump moves
along the valley to where it is sharper than 2 / lr, and the next window catapults out and
gives back part of the gain. The default accept test compares only the loss at each candidate
f(x). This probe compares f(x - lr * grad f(x)), the loss one GD step after the candidate:
a candidate in a region too sharp for the learning rate fails that test, because the step
from it overshoots. Each candidate then costs one backprop + one forward (4 forward units,
charged), against one forward for the default test.

Runs plain GD, GD + default DMD, and GD + DMD with the look-ahead test; one seed; prints the
final errors and the cost at which each DMD run first reaches plain's final error.

    python benchmarks/probe_lookahead_accept.py [--lr 8] [--steps 400] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()

    import dmdopt.training.accelerator as accelerator_module
    from dmdopt.bench import _configs, _dataset, _problem
    from dmdopt.training.config import DMDConfig
    from dmdopt.training.loop import train

    base = accelerator_module.DMDAccelerator
    lr = args.lr

    class LookAhead(base):
        """The accept test's loss is the loss one GD step after the weights under test."""

        def _loss(self, closure):
            loss_fn = getattr(closure, "__wrapped__", closure)  # the loop's closure is no_grad
            params = [p for p in self.model.parameters() if p.requires_grad]
            saved = [p.detach().clone() for p in params]
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(), params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(lr * g)
                value = float(loss_fn())
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            self.stats["forward_passes"] += 1
            if self.cost is not None:  # a backprop (3 forward units) + a forward
                self.cost.forward_passes += 4 * self.forward_weight
            return value if value == value and value != float("inf") else float("inf")

    dataset = _dataset(False, "dmdopt-runs/data")
    model = _problem(False)[1]
    training = _configs("gd", lr=lr, steps=args.steps, seed=args.seed)
    dmd = DMDConfig(window=args.window)
    plain = train(dataset=dataset, model=model, training=training)
    target = plain.val_error
    print(f"plain GD lr {lr:g}, {args.steps} steps, seed {args.seed}: final val {target:.4f} "
          f"at {plain.backprop_equivalent:.0f} bpe")
    for name, cls in (("default accept test", base), ("look-ahead accept test", LookAhead)):
        accelerator_module.DMDAccelerator = cls
        try:
            result = train(dataset=dataset, model=model, training=training, dmd=dmd)
        finally:
            accelerator_module.DMDAccelerator = base
        reached = result.cost_to_reach(target)
        ratio = f"{reached[0] / plain.backprop_equivalent:.3f}x" if reached else "not reached"
        print(f"  + DMD, {name:24s}: final val {result.val_error:.4f} at "
              f"{result.backprop_equivalent:.0f} bpe; plain's final error at "
              f"{reached[0] if reached else float('nan'):.0f} bpe ({ratio}); jumps "
              f"{result.jumps_accepted}/{result.jumps_accepted + result.jumps_rejected}")


if __name__ == "__main__":  # the dataset build spawns workers
    main()
