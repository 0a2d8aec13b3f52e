"""SparseCodes: a batch of crosscoder latent activations in CSR form."""

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ops import csr


@dataclass
class SparseCodes:
    """A batch of crosscoder latent activations in CSR form (what CrossCoder.encode returns).

    Entries are sorted by row, then by latent. Batch top-k codes have exactly k * B entries; an entry kept with
    a non-positive score carries value 0.

    Attributes:
        values: [nnz] the kept activations (the unscaled f).
        indices: [nnz] latent ids, int32 unless F needs more.
        row_ptr: [B+1] int64 row pointers: row b's entries are values[row_ptr[b]:row_ptr[b + 1]].
        n_rows: B, the number of rows of the batch.
        n_latents: F, the dictionary size.
        order: The entries sorted by latent, (col_ptr [F+1], perm [nnz], rows [nnz]) as the latent_order op
            returns them, when the training forward computed it for the backward (both weight gradients reduce
            over it); None otherwise.
    """

    values: torch.Tensor
    indices: torch.Tensor
    row_ptr: torch.Tensor
    n_rows: int
    n_latents: int
    order: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return self.values.shape[0]

    def rows(self) -> torch.Tensor:
        """Row id of every entry.

        Returns:
            [nnz] int64 row ids, ascending.
        """
        return csr.rows_of(self.row_ptr, self.nnz)

    def to_dense(self) -> torch.Tensor:
        """The codes as a dense matrix (differentiable in values).

        Returns:
            [B, F] in the values' dtype, zero where no entry is stored.
        """
        return csr.to_dense(self.values, self.indices, self.row_ptr, self.n_latents)

    def active_per_row(self) -> torch.Tensor:
        """Number of entries with a non-zero value in each row (the row's L0).

        Returns:
            [B] int64 counts.
        """
        nonzero = (self.values != 0).to(torch.int64)
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=self.values.device)
        return counts.index_add_(0, self.rows(), nonzero)
