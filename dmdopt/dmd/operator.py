"""Exact DMD on POD coefficients: the reduced operator, its eigenvalues and modes.

For a sequence of columns Y = [y_0 .. y_n], X0 = Y[:, :n] and X1 = Y[:, 1:], DMD seeks the
best linear map X1 ~ A X0.  With the POD X0 ~ U Sigma V^T the map is represented on span(U) by
the r x r reduced operator

    A~ = U^T X1 V Sigma^-1 = (V Sigma^-1)^T (X0^T X1) (V Sigma^-1),

and since U = X0 V Sigma^-1, every ingredient is a block of the (n+1) x (n+1) Gram Y^T Y: the
operator costs O(r^3 + n^2 r) once the Gram exists and never touches the p-dimensional data.
A~ = W diag(lambda) W^-1 gives the DMD eigenvalues; the (projected) modes are U W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pod import SnapshotPOD, pod_from_gram

__all__ = ["DMDOperator", "dmd_from_gram"]


@dataclass(frozen=True)
class DMDOperator:
    """The small matrices of one DMD fit (float64 / complex128, on the CPU)."""

    pod: SnapshotPOD  # POD of X0
    reduced: Tensor  # A~, (r, r) float64
    eigenvalues: Tensor  # lambda, (r,) complex128
    eigenvectors: Tensor  # W, (r, r) complex128, unit-norm columns

    @property
    def rank(self) -> int:
        return self.pod.rank

    def reduce(self, x0_dot_y: Tensor) -> Tensor:
        """U^T y (r,) from X0^T y (n,): reduced coordinates without touching the p-vector y."""
        return self.pod.coefficients.T @ x0_dot_y.to(torch.float64)

    def projected_modes(self, basis: Tensor) -> Tensor:
        """DMD modes U W (p x r, complex) from the POD basis U (p x r, real)."""
        cdtype = torch.complex128 if basis.dtype == torch.float64 else torch.complex64
        return basis.to(cdtype) @ self.eigenvectors.to(basis.device, cdtype)


def dmd_from_gram(gram: Tensor, rank: int | float | str, *, n_rows: int) -> DMDOperator | None:
    """Exact DMD of the column sequence whose (n+1) x (n+1) Gram is `gram`.

    Returns None when the rank rule leaves nothing (all-zero or non-finite data).  Raises
    torch.linalg.LinAlgError only if the eigensolver itself fails.
    """
    gram = gram.to("cpu", torch.float64)
    n = gram.shape[0] - 1
    if n < 1:
        return None
    small = pod_from_gram(gram[:n, :n], rank, n_rows=n_rows)
    if small.rank == 0:
        return None
    coeff = small.coefficients  # V Sigma^-1
    reduced = coeff.T @ gram[:n, 1:] @ coeff
    eigenvalues, eigenvectors = torch.linalg.eig(reduced)
    return DMDOperator(small, reduced, eigenvalues, eigenvectors)
