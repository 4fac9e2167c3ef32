"""The regressor: physical parameters -> concentration field.

An MLP by default. Input and output scaling are fitted on the *training split only* and
stored as buffers inside the module, so a saved model (checkpoint, `mlflow.pytorch`) maps raw
parameters to raw fields with nothing else to carry around.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the MLP. `depth` counts hidden layers."""

    width: int = 128
    depth: int = 3
    activation: str = "tanh"

    def __post_init__(self) -> None:
        # below 2**63: torch takes sizes as int64 (a larger one was a TypeError traceback)
        if not isinstance(self.width, int) or isinstance(self.width, bool) or not 1 <= self.width < 2**63:
            raise ValueError(f"model.width must be a positive integer below 2**63, got {self.width!r}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 1 <= self.depth < 2**63:
            raise ValueError(f"model.depth must be a positive integer below 2**63, got {self.depth!r}")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def n_parameters(self, n_inputs: int, n_outputs: int) -> int:
        """The `Regressor`'s parameter count, without building it (a size check's input)."""
        w = self.width
        return n_inputs * w + w + (self.depth - 1) * (w * w + w) + w * n_outputs + n_outputs

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model: unknown key {unknown[0]!r}")
        return cls(**data)


@dataclass(frozen=True)
class Scaling:
    """Affine scaling fitted on the training split.

    Inputs are standardised per column. Outputs use a per-pixel mean and ONE global standard
    deviation: per-pixel deviations are ~0 near inflow boundaries and would blow up the loss.
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: float

    @classmethod
    def fit(cls, x_train: np.ndarray, y_train: np.ndarray) -> Scaling:
        x_std = x_train.std(axis=0)
        x_std = np.where(x_std > 0, x_std, 1.0)
        y_std = float(y_train.std())
        return cls(
            x_mean=x_train.mean(axis=0).astype(np.float32),
            x_std=x_std.astype(np.float32),
            y_mean=y_train.mean(axis=0).astype(np.float32),
            y_std=y_std if y_std > 0 else 1.0,
        )


class Regressor(nn.Module):
    """MLP from raw parameters to the raw flattened field; scaling lives in buffers."""

    def __init__(self, *, n_inputs: int, n_outputs: int, config: ModelConfig,
                 scaling: Scaling | None = None) -> None:
        super().__init__()
        self.config = config
        act = ACTIVATIONS[config.activation]
        layers: list[nn.Module] = []
        width_in = n_inputs
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.width), act()]
            width_in = config.width
        layers.append(nn.Linear(width_in, n_outputs))
        self.net = nn.Sequential(*layers)
        if scaling is None:
            scaling = Scaling(np.zeros(n_inputs, np.float32), np.ones(n_inputs, np.float32),
                              np.zeros(n_outputs, np.float32), 1.0)
        self.register_buffer("x_mean", torch.as_tensor(scaling.x_mean))
        self.register_buffer("x_std", torch.as_tensor(scaling.x_std))
        self.register_buffer("y_mean", torch.as_tensor(scaling.y_mean))
        self.register_buffer("y_std", torch.tensor(float(scaling.y_std)))

    def forward_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction in scaled output space (what the training loss sees)."""
        return self.net((x - self.x_mean) / self.x_std)

    def scale_targets(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.y_mean) / self.y_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_scaled(x) * self.y_std + self.y_mean


def build_regressor(config: ModelConfig, x_train: np.ndarray, y_train: np.ndarray) -> Regressor:
    """A regressor whose scaling is fitted on the given (training) arrays."""
    return Regressor(n_inputs=x_train.shape[1], n_outputs=y_train.shape[1], config=config,
                     scaling=Scaling.fit(x_train, y_train))
