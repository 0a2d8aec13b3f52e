"""SparseCodes: a batch of crosscoder latent activations in CSR form."""

from dataclasses import dataclass

import torch

from ..ops import csr


@dataclass
class SparseCodes:
    """values [nnz] (the unscaled f), indices [nnz] latent ids (int32 unless F needs more), row_ptr [B+1] int64.

    Entries are sorted by row, then by latent. Batch top-k codes have exactly k * B entries; an entry kept with
    a non-positive score carries value 0.
    """

    values: torch.Tensor
    indices: torch.Tensor
    row_ptr: torch.Tensor
    n_rows: int
    n_latents: int

    @property
    def nnz(self):
        return self.values.shape[0]

    def rows(self):
        """Row id of every entry, [nnz] int64."""
        return csr.rows_of(self.row_ptr, self.nnz)

    def to_dense(self):
        """[B, F] dense codes (differentiable in values)."""
        return csr.to_dense(self.values, self.indices, self.row_ptr, self.n_latents)

    def active_per_row(self):
        """Number of entries with a non-zero value in each row (the row's L0), [B] int64."""
        nonzero = (self.values != 0).to(torch.int64)
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=self.values.device)
        return counts.index_add_(0, self.rows(), nonzero)
