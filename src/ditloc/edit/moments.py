"""Second moments of one block's text states and the closed-form solves on them
(see :mod:`ditloc.edit.closed_form`)."""

from __future__ import annotations

import torch


class _Moments:
    """Running means C = c c^T, A = a c^T, D = d d^T of one block (float64)."""

    def __init__(self, dim: int, device):
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        z = lambda: torch.zeros(dim, dim, dtype=dtype, device=device)
        self.C, self.A, self.AA, self.D = z(), z(), z(), z()
        self.nc = self.nd = 0

    def add_pairs(self, c: torch.Tensor, a: torch.Tensor):  # [N, dim] each
        c, a = c.to(self.C.dtype), a.to(self.C.dtype)
        self.C += c.T @ c
        self.A += a.T @ c
        self.AA += a.T @ a  # only for the fit report
        self.nc += c.shape[0]

    @classmethod
    def combine(cls, concepts: list[_Moments], preserve: _Moments | None) -> _Moments:
        """A block's moments from its concepts' (summed) and the preserved rows' (shared, not copied)."""
        m = cls.__new__(cls)
        ref = concepts[0] if concepts else preserve
        m.C, m.A, m.AA = (sum(getattr(c, k) for c in concepts) if concepts else torch.zeros_like(ref.C)
                          for k in ("C", "A", "AA"))
        m.nc = sum(c.nc for c in concepts)
        m.D, m.nd = (preserve.D, preserve.nd) if preserve is not None else (None, 0)  # D: set before solving
        return m

    def fold(self, other: _Moments) -> None:
        """Add `other`'s concept rows to these."""
        self.C += other.C
        self.A += other.A
        self.AA += other.AA
        self.nc += other.nc

    def add_preserve(self, d: torch.Tensor):
        d = d.to(self.D.dtype)
        self.D += d.T @ d
        self.nd += d.shape[0]

    def solve(self, lam: float, mu: float) -> torch.Tensor:
        """M with W' = W M."""
        C, A = self.C / self.nc, self.A / self.nc
        D = self.D / self.nd if self.nd else torch.zeros_like(C)
        lhs = C + lam * D
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        ridge = mu * float(torch.trace(lhs)) / C.shape[0]
        lhs = lhs + ridge * eye
        rhs = A + lam * D + ridge * eye
        # W' = W rhs lhs^-1; lhs is symmetric, so M = (lhs^-1 rhs^T)^T
        return torch.linalg.solve(lhs, rhs.T).T

    def solve_nullspace(self, mu: float, tol: float, projector: torch.Tensor | None = None) -> torch.Tensor:
        """M = I + (A - C) P (P C P + mu' I)^-1 P with P the projector onto the directions
        the preserved states do not span (eigenvalues of D below `tol` x the largest): the
        least-squares map of the concept rows to their anchors among edits W' = W + E P,
        so W' d = W d for every preserved d (up to the dropped eigenvalues). `projector`:
        P when already known (blocks that share the preserved states share it)."""
        C, A = self.C / self.nc, self.A / self.nc
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        P = projector if projector is not None else self.null_projector(tol)
        PCP = P @ C @ P
        ridge = mu * float(torch.trace(C)) / C.shape[0]
        return eye + (A - C) @ P @ torch.linalg.solve(PCP + ridge * eye, P)

    def null_projector(self, tol: float) -> torch.Tensor:
        eye = torch.eye(self.C.shape[0], dtype=self.C.dtype, device=self.C.device)
        if not self.nd:
            return eye
        evals, evecs = torch.linalg.eigh(self.D / self.nd)
        span = evecs[:, evals > tol * evals.max().clamp_min(1e-300)]
        return eye - span @ span.T
