"""What the full-batch probes share: the default problem and model, initialised as `train`
initialises them at a seed, as CPU tensors (training inputs, raw and scaled targets,
validation)."""

from __future__ import annotations

import numpy as np
import torch


def default_problem(seed: int, cache_dir: str):
    """(net, x, y, y_scaled, x_val, y_val) for the default problem and model at `seed`."""
    from dmdopt.model import ModelConfig, build_regressor
    from dmdopt.problem import ProblemConfig, load_dataset

    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    dataset = load_dataset(ProblemConfig(), cache_dir=cache_dir, progress=False)
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    x_np, y_np = dataset.split("train")
    x_val, y_val = (as_t(a) for a in dataset.split("val"))
    net = build_regressor(ModelConfig(), x_np, y_np)  # the same init as `train` at this seed
    y = as_t(y_np)
    return net, as_t(x_np), y, net.scale_targets(y), x_val, y_val
