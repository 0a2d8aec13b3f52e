"""Small CSR helpers shared by the references, the fake kernels and SparseCodes."""

import torch

INT32_MAX = 2**31 - 1


def index_dtype(n_latents: int) -> torch.dtype:
    """Latent ids are int32 unless F needs more."""
    return torch.int32 if n_latents <= INT32_MAX else torch.int64


def rows_of(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row id of every entry: [nnz] int64."""
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.arange(row_ptr.shape[0] - 1, device=row_ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def row_ptr_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """row_ptr [B+1] int64 from sorted row ids."""
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    row_ptr[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return row_ptr


def to_dense(values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int) -> torch.Tensor:
    """[B, F] dense codes (differentiable in values)."""
    n_rows = row_ptr.shape[0] - 1
    rows = rows_of(row_ptr, values.shape[0])
    dense = values.new_zeros(n_rows, n_latents)
    return dense.index_put((rows, indices.long()), values, accumulate=True)
