"""Cost accounting: count work, never guess it.

Training cost is reported in *backprop-equivalent steps* (bpe), one deterministic figure:

    bpe = backprop_steps + forward_passes / 3 + dmd_flops / flops_per_backprop

A forward-only pass over one training batch costs 1/3 of a backprop step (forward + backward
~ 3 forward). DMD linear algebra is counted analytically (`dmdopt.dmd.dmd_flops`) and divided by
the analytic FLOPs of one backprop step (6 x parameters x batch rows, the standard dense-layer
estimate). Monitoring evaluations (the learning curve) are not training cost and are not counted.
Wall time is measured separately and reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CostCounter:
    """Running totals of the work done by one training run."""

    flops_per_backprop: float
    backprop_steps: int = 0
    forward_passes: float = 0.0  # in units of one forward pass over one training batch
    dmd_flops: float = 0.0

    @property
    def backprop_equivalent(self) -> float:
        return (self.backprop_steps + self.forward_passes / 3.0
                + self.dmd_flops / self.flops_per_backprop)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["backprop_equivalent"] = self.backprop_equivalent
        return data


def flops_per_backprop(n_params: int, batch_rows: int) -> float:
    """Analytic FLOPs of one forward+backward over a batch (6 * params * rows)."""
    return 6.0 * n_params * batch_rows
