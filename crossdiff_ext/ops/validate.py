"""Argument checks run before any backend's kernel: each error names the argument and what was expected.

The C++ entry points repeat these checks (csrc/checks.h) for callers that use torch.ops.crossdiff directly.
"""

from typing import Any, NoReturn, Optional, Union

import torch

from ..errors import InputError

FLOATING = (torch.float32, torch.float16, torch.bfloat16)


def _fail(message: str) -> NoReturn:
    raise InputError(message)


def tensor(t: Any, name: str, rank: int, shape: str) -> None:
    """`t` is a tensor of rank `rank` (`shape` describes it in the message)."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(f"{name} must have shape {shape} (rank {rank}), got rank {t.dim()} with sizes {tuple(t.shape)}")


def floating(t: torch.Tensor, name: str) -> None:
    """`t` is float32, float16 or bfloat16."""
    if t.dtype not in FLOATING:
        _fail(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def same_dtype(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    """`a` (named `an`) and `b` (named `bn`) have one dtype."""
    if a.dtype != b.dtype:
        _fail(f"{an} and {bn} must have the same dtype, got {a.dtype} and {b.dtype}")


def same_device(a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    """`a` (named `an`) and `b` (named `bn`) are on one device."""
    if a.device != b.device:
        _fail(f"{an} and {bn} must be on the same device, got {a.device} and {b.device}")


def index(t: torch.Tensor, name: str) -> None:
    """`t` holds int32 or int64 ids."""
    if t.dtype not in (torch.int32, torch.int64):
        _fail(f"{name} must be int32 or int64, got {t.dtype}")


def paired_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> None:
    """The arguments of paired_encode: x [B, M, d], W_enc [F, M, d], b_enc [F] of one dtype and device."""
    tensor(x, "x", 3, "[B, M, d]")
    tensor(W_enc, "W_enc", 3, "[F, M, d]")
    tensor(b_enc, "b_enc", 1, "[F]")
    floating(x, "x")
    same_dtype(x, "x", W_enc, "W_enc")
    same_dtype(x, "x", b_enc, "b_enc")
    same_device(x, "x", W_enc, "W_enc")
    same_device(x, "x", b_enc, "b_enc")
    if x.shape[1:] != W_enc.shape[1:]:
        _fail(
            f"x [B, M, d] must match W_enc [F, M, d] in M and d, got x {tuple(x.shape)} and W_enc {tuple(W_enc.shape)}"
        )
    if b_enc.shape[0] != W_enc.shape[0]:
        _fail(f"b_enc must have F = {W_enc.shape[0]} entries, got {b_enc.shape[0]}")


def weights(w: torch.Tensor, n_latents: int, device: torch.device) -> None:
    """The decoder-norm weights w: [F] float32 on the scores' device."""
    tensor(w, "w", 1, "[F]")
    if w.dtype != torch.float32:
        _fail(f"w (decoder-norm weights) must be float32, got {w.dtype}")
    if w.device != device:
        _fail(f"w must be on {device} with the scores, got {w.device}")
    if w.shape[0] != n_latents:
        _fail(f"w must have F = {n_latents} entries, got {w.shape[0]}")


def top_count(K: Any, n_rows: int, n_latents: int) -> None:
    """K of batch top-K: an int in [1, B * F]."""
    if not isinstance(K, int) or isinstance(K, bool):
        _fail(f"K must be an int, got {type(K).__name__}")
    if not 1 <= K <= n_rows * n_latents:
        _fail(f"K = k * B must be in [1, B * F] = [1, {n_rows * n_latents}], got {K}")


def theta_value(theta: float) -> None:
    """The selection threshold: theta >= 0 (not NaN)."""
    if not theta >= 0:
        _fail(f"theta must be >= 0 (an unset threshold is -1: set it or use batch top-k), got {theta}")


def flag(name: str, value: Any) -> None:
    """A boolean option of an op (a bool, not a truthy value)."""
    if not isinstance(value, bool):
        _fail(f"{name} must be a bool, got {type(value).__name__}")


def selection(f: torch.Tensor, w: torch.Tensor) -> None:
    """The arguments every selection takes: f [B, F] floating, w [F] float32."""
    tensor(f, "f", 2, "[B, F]")
    floating(f, "f")
    weights(w, f.shape[1], f.device)


def batch_topk(f: torch.Tensor, w: torch.Tensor, K: int) -> None:
    """The arguments of batch_topk."""
    selection(f, w)
    top_count(K, f.shape[0], f.shape[1])


def threshold_select(f: torch.Tensor, w: torch.Tensor, theta: float) -> None:
    """The arguments of threshold_select."""
    selection(f, w)
    theta_value(theta)


def encode_selection(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, w: torch.Tensor, mode: str, param: Union[int, float]
) -> None:
    """paired_encode followed by a selection, checked without materialising f."""
    paired_encode(x, W_enc, b_enc)
    weights(w, W_enc.shape[0], x.device)
    if mode == "topk":
        top_count(param, x.shape[0], W_enc.shape[0])
    elif mode == "threshold":
        theta_value(param)
    else:
        _fail(f"mode must be 'topk' or 'threshold', got {mode!r}")


def row_pointers(row_ptr: torch.Tensor) -> None:
    """row_ptr: [B+1] int64 with at least one entry."""
    tensor(row_ptr, "row_ptr", 1, "[B+1]")
    if row_ptr.dtype != torch.int64:
        _fail(f"row_ptr must be int64, got {row_ptr.dtype}")
    if row_ptr.shape[0] < 1:
        _fail("row_ptr must have B+1 >= 1 entries")


def rows_for_codes(row_ptr: torch.Tensor, nnz: int, name: str = "indices") -> None:
    """Codes need rows (the GPU kernels would index row 0 of an empty batch); from sizes alone, no sync."""
    if row_ptr.shape[0] < 2 and nnz != 0:
        _fail(
            f"{name} has nnz = {nnz} entries but row_ptr has B+1 = 1 entry (B = 0 rows); codes of an empty batch "
            "have nnz = 0"
        )


def latent_ids(indices: torch.Tensor) -> None:
    """indices: [nnz] int32 or int64 latent ids."""
    tensor(indices, "indices", 1, "[nnz]")
    index(indices, "indices")


def codes(values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor) -> None:
    """CSR codes: values and indices [nnz], row_ptr [B+1] int64, on one device."""
    tensor(values, "values", 1, "[nnz]")
    latent_ids(indices)
    row_pointers(row_ptr)
    if values.shape[0] != indices.shape[0]:
        _fail(f"values and indices must have the same length (nnz), got {values.shape[0]} and {indices.shape[0]}")
    same_device(values, "values", indices, "indices")
    same_device(values, "values", row_ptr, "row_ptr")
    rows_for_codes(row_ptr, indices.shape[0])


def dictionary(values: torch.Tensor, W: torch.Tensor, name: str = "W") -> None:
    """A dictionary W [F, M, d] floating, of the codes' dtype and device."""
    tensor(W, name, 3, "[F, M, d]")
    floating(W, name)
    same_dtype(values, "values", W, name)
    same_device(values, "values", W, name)


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor, bias: Optional[torch.Tensor]
) -> None:
    """The arguments of sparse_decode (bias [M, d] or None)."""
    codes(values, indices, row_ptr)
    dictionary(values, W)
    if bias is not None:
        tensor(bias, "bias", 2, "[M, d]")
        same_dtype(W, "W", bias, "bias")
        same_device(W, "W", bias, "bias")
        if bias.shape != W.shape[1:]:
            _fail(f"bias must be [M, d] = {list(W.shape[1:])}, got {tuple(bias.shape)}")


def decoder(W_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> None:
    """W_dec [F, M, d] and b_dec [M, d] matching the encoder W_enc."""
    tensor(W_dec, "W_dec", 3, "[F, M, d]")
    tensor(b_dec, "b_dec", 2, "[M, d]")
    if W_dec.shape != W_enc.shape:
        _fail(f"W_dec must have W_enc's shape [F, M, d] = {tuple(W_enc.shape)}, got {tuple(W_dec.shape)}")
    if b_dec.shape != W_dec.shape[1:]:
        _fail(f"b_dec must be [M, d] = {list(W_dec.shape[1:])}, got {tuple(b_dec.shape)}")
    for t, name in ((W_dec, "W_dec"), (b_dec, "b_dec")):
        same_dtype(W_enc, "W_enc", t, name)
        same_device(W_enc, "W_enc", t, name)


def rows_dense(dense: torch.Tensor, name: str, row_ptr: torch.Tensor, W: torch.Tensor) -> None:
    """A dense [B, M, d] per-row tensor matching row_ptr's B and W's M, d, dtype and device."""
    tensor(dense, name, 3, "[B, M, d]")
    if dense.shape[0] != row_ptr.shape[0] - 1:
        _fail(f"{name} must have B = {row_ptr.shape[0] - 1} rows (row_ptr has B+1 entries), got {dense.shape[0]}")
    if dense.shape[1:] != W.shape[1:]:
        _fail(f"{name} must be [B, M, d] with M, d of W {tuple(W.shape)}, got {tuple(dense.shape)}")
    same_dtype(dense, name, W, "W")
    same_device(dense, name, W, "W")


def sparse_values_grad(grad_out: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor, W: torch.Tensor) -> None:
    """The arguments of sparse_values_grad."""
    latent_ids(indices)
    row_pointers(row_ptr)
    tensor(W, "W", 3, "[F, M, d]")
    floating(W, "W")
    rows_dense(grad_out, "grad_out", row_ptr, W)
    same_device(indices, "indices", W, "W")
    same_device(row_ptr, "row_ptr", W, "W")
    rows_for_codes(row_ptr, indices.shape[0])


def latent_order(indices: torch.Tensor, row_ptr: torch.Tensor, n_latents: int) -> None:
    """The arguments of latent_order."""
    latent_ids(indices)
    row_pointers(row_ptr)
    same_device(indices, "indices", row_ptr, "row_ptr")
    if n_latents < 1:
        _fail(f"n_latents must be >= 1, got {n_latents}")
    rows_for_codes(row_ptr, indices.shape[0])


def sparse_weight_grad(
    values: torch.Tensor, dense: torch.Tensor, col_ptr: torch.Tensor, perm: torch.Tensor, rows: torch.Tensor
) -> None:
    """The arguments of sparse_weight_grad."""
    tensor(values, "values", 1, "[nnz]")
    floating(values, "values")
    tensor(dense, "dense", 3, "[B, M, d]")
    same_dtype(values, "values", dense, "dense")
    same_device(values, "values", dense, "dense")
    for t, name, shape in ((col_ptr, "col_ptr", "[F+1]"), (perm, "perm", "[nnz]"), (rows, "rows", "[nnz]")):
        tensor(t, name, 1, shape)
        if t.dtype != torch.int64:
            _fail(f"{name} must be int64, got {t.dtype}")
        same_device(values, "values", t, name)
    if perm.shape[0] != values.shape[0] or rows.shape[0] != values.shape[0]:
        _fail(f"perm and rows must have nnz = {values.shape[0]} entries, got {perm.shape[0]} and {rows.shape[0]}")
    if dense.shape[0] < 1 and values.shape[0] != 0:
        _fail(
            f"values has nnz = {values.shape[0]} entries but dense has B = 0 rows; codes of an empty batch have nnz = 0"
        )


def codes_order(order: Any, values: torch.Tensor, W: torch.Tensor) -> None:
    """`order` is a latent order (col_ptr [F+1], perm [nnz], rows [nnz], int64) of codes with values' nnz entries
    over W's F latents, on values' device: what encode_sparse(..., with_order=True) returns for them."""
    if not isinstance(order, (tuple, list)) or len(order) != 3:
        _fail("order must be (col_ptr, perm, rows) as encode_sparse(..., with_order=True) returns it")
    col_ptr, perm, rows = order
    nnz, F = values.shape[0], W.shape[0]
    for t, name, shape in ((col_ptr, "col_ptr", "[F+1]"), (perm, "perm", "[nnz]"), (rows, "rows", "[nnz]")):
        tensor(t, f"order's {name}", 1, shape)
        if t.dtype != torch.int64:
            _fail(f"order's {name} must be int64, got {t.dtype}")
        same_device(values, "values", t, f"order's {name}")
    if col_ptr.shape[0] != F + 1 or perm.shape[0] != nnz or rows.shape[0] != nnz:
        _fail(
            f"order must be the latent order of these codes (F = {F} latents, nnz = {nnz}): got col_ptr of "
            f"{col_ptr.shape[0]}, perm of {perm.shape[0]} and rows of {rows.shape[0]} entries"
        )
