"""Triton paired encoder: f = ReLU(x W_enc^T + b_enc) as one GEMM with K = M * d, bias + ReLU in the epilogue
(ReLU keeps NaN, as torch.relu). When BLOCK_K divides K (the paper's K = 2 * 2304 for every config) the K loop
loads its tiles without a K mask. Half inputs in a TMA-aligned flat layout load their tiles through tensor
descriptors on Hopper (see descriptors()); everything else, sm_80 included, through pointers.

Reference: crossdiff_ext/ops/encode.py (paired_encode_reference).

x [B, M, d] is read in place. When its model stride is d (x[b] is one contiguous [M * d] row, whatever the batch
stride) the K loop walks it directly; otherwise (per-model slices of a larger buffer) each K offset is split
into (model, feature) and addressed with x's model stride, so nothing is concatenated or copied. fp32
accumulation; fp32 inputs use IEEE products (no TF32), matching the reference's fp32 matmul.
"""

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..errors import InputError
from . import _launch

# Pins the encoder's launch config instead of autotuning: "first" (the first config of the dtype's list below) or
# "BLOCK_B,BLOCK_F,BLOCK_K,GROUP_B,num_stages,num_warps". Unset or empty: autotune. The GPU tests pin "first": the
# autotuner would time every config for every new shape they draw.
PIN_ENV = "CROSSDIFF_TRITON_ENCODE_CONFIG"


def _descriptor_blocks(nargs):
    """A config's pre_hook: tensor descriptors load tiles of the config's blocks (pointer arguments: nothing)."""
    if isinstance(nargs["x_ptr"], TensorDescriptor):
        nargs["x_ptr"].block_shape = [nargs["BLOCK_B"], nargs["BLOCK_K"]]
        nargs["W_ptr"].block_shape = [nargs["BLOCK_F"], nargs["BLOCK_K"]]


def _config(bb, bf, bk, stages, warps):
    return triton.Config(
        dict(BLOCK_B=bb, BLOCK_F=bf, BLOCK_K=bk, GROUP_B=8),
        num_warps=warps,
        num_stages=stages,
        pre_hook=_descriptor_blocks,
    )


if _launch.interpreted():  # the interpreter would benchmark every config: one small one
    HALF_CONFIGS = FP32_CONFIGS = [
        triton.Config(
            dict(BLOCK_B=16, BLOCK_F=32, BLOCK_K=32, GROUP_B=4), num_warps=4, num_stages=1, pre_hook=_descriptor_blocks
        )
    ]
else:
    # bf16/fp16: Hopper wgmma tiles (4-warp groups); shared memory of each fits H100's 227 KB.
    HALF_CONFIGS = [
        _config(*c)
        for c in (
            (128, 256, 64, 3, 8),
            (256, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 128, 64, 4, 4),
            (128, 256, 32, 4, 8),
            (64, 256, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
        )
    ]
    # fp32 with IEEE products runs on FMA units: small tiles keep the accumulators in registers (the half tiles
    # compile to 255 registers with spills in fp32, ptxas -v on sm_90a).
    FP32_CONFIGS = [
        _config(*c) for c in ((64, 64, 32, 3, 4), (64, 128, 32, 3, 4), (128, 64, 32, 3, 4), (32, 128, 32, 3, 4))
    ]


def _prune(configs, named_args, **kwargs):
    wanted = FP32_CONFIGS if kwargs.get("IEEE") else HALF_CONFIGS
    return [c for c in configs if any(c is w for w in wanted)]


def batch_bucket(B: int) -> int:
    """The autotuning key's batch size: B rounded up to a power of two, so that a new batch size within the same
    octave reuses the tuned config instead of timing every config again."""
    return triton.next_power_of_2(max(int(B), 1))


def pinned_config(ieee: bool) -> "triton.Config | None":
    """The config that PIN_ENV pins for fp32 (`ieee`) or half inputs; None when the encoder autotunes."""
    spec = os.environ.get(PIN_ENV, "").strip()
    if not spec:
        return None
    if spec == "first":
        return (FP32_CONFIGS if ieee else HALF_CONFIGS)[0]
    try:
        bb, bf, bk, gb, stages, warps = (int(v) for v in spec.split(","))
    except ValueError:
        raise InputError(
            f"{PIN_ENV}={spec!r}: expected 'first' or six ints BLOCK_B,BLOCK_F,BLOCK_K,GROUP_B,num_stages,num_warps"
        ) from None
    blocks = dict(BLOCK_B=bb, BLOCK_F=bf, BLOCK_K=bk, GROUP_B=gb)
    if any(v < 1 or v & (v - 1) for v in (bb, bf, bk, warps)) or min(bb, bf, bk) < 16 or gb < 1 or stages < 1:
        raise InputError(
            f"{PIN_ENV}={spec!r}: BLOCK_B, BLOCK_F, BLOCK_K must be powers of two >= 16 and num_warps a power of "
            "two; GROUP_B and num_stages >= 1"
        )
    return triton.Config(blocks, num_warps=warps, num_stages=stages, pre_hook=_descriptor_blocks)


@triton.jit(do_not_specialize=["B_BUCKET"])  # one compiled kernel whatever the bucket
def _encode_kernel(
    x_ptr,
    W_ptr,
    b_ptr,
    f_ptr,
    B,
    F,
    K,
    d,
    stride_xb,
    stride_xm,
    B_BUCKET,  # read by the autotuner's key only
    FLAT: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K mask on the tile loads
    DESC: tl.constexpr,  # x_ptr, W_ptr are tensor descriptors of x [B, K] and W [F, K] (TMA on Hopper)
    RELU: tl.constexpr,  # False: the pre-activations, for a selection that applies ReLU as it reads them
    BLOCK_B: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_B: tl.constexpr,
):
    # Grouped launch order: consecutive programs share a band of x rows and sweep latents, so W tiles are
    # reused from L2 by GROUP_B programs.
    pid = tl.program_id(0)
    n_b = tl.cdiv(B, BLOCK_B)
    n_f = tl.cdiv(F, BLOCK_F)
    per_group = GROUP_B * n_f
    first_b = (pid // per_group) * GROUP_B
    group_rows = tl.minimum(n_b - first_b, GROUP_B)
    pid_b = first_b + (pid % per_group) % group_rows
    pid_f = (pid % per_group) // group_rows

    rb = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rf = pid_f.to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    in_b = rb < B
    in_f = rf < F
    acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if DESC:  # tiles past B, F or K read as zeros
            a = x_ptr.load([pid_b * BLOCK_B, k0])
            w = W_ptr.load([pid_f * BLOCK_F, k0]).T
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            if FLAT:
                x_off = kk
            else:
                x_off = (kk // d).to(tl.int64) * stride_xm + kk % d
            x_tile = x_ptr + rb[:, None] * stride_xb + x_off[None, :]
            w_tile = W_ptr + rf[None, :] * K + kk[:, None]
            if EVEN_K:
                a = tl.load(x_tile, mask=in_b[:, None], other=0.0)
                w = tl.load(w_tile, mask=in_f[None, :], other=0.0)
            else:
                in_k = kk < K
                a = tl.load(x_tile, mask=in_b[:, None] & in_k[None, :], other=0.0)
                w = tl.load(w_tile, mask=in_k[:, None] & in_f[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    acc += tl.load(b_ptr + rf, mask=in_f, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.relu
    tl.store(f_ptr + rb[:, None] * F + rf[None, :], acc.to(f_ptr.dtype.element_ty), mask=in_b[:, None] & in_f[None, :])


def even_k(K: int, block_k: int) -> bool:
    """Whether the K loop needs no K mask: every [BLOCK_K] step lies inside K."""
    return K % block_k == 0


# Tuned once per (batch octave, F, K, layout, descriptors, dtype): training runs one batch size, inference a few.
# EVEN_K follows each config's BLOCK_K (K is in the key, so a tuned config keeps its EVEN_K).
_encode_autotuned = triton.autotune(
    configs=HALF_CONFIGS + [c for c in FP32_CONFIGS if all(c is not h for h in HALF_CONFIGS)],
    key=["B_BUCKET", "F", "K", "FLAT", "DESC", "IEEE"],
    prune_configs_by=dict(early_config_prune=_prune),
)(triton.heuristics(dict(EVEN_K=lambda args: even_k(args["K"], args["BLOCK_K"])))(_encode_kernel))


def descriptors(x: torch.Tensor, W_enc: torch.Tensor) -> "tuple[TensorDescriptor, TensorDescriptor] | None":
    """Tensor descriptors of x as [B, K] and W_enc as [F, K] where the encoder loads its tiles through them: on
    Hopper and newer GPUs (TMA) and under the interpreter, for half inputs and a flat x (x[b] one [M * d] row)
    whose base addresses and row strides are multiples of 16 bytes (TMA's alignment). None elsewhere: the
    pointer loads. fp32 stays on pointers: its IEEE FMA tiles spill with descriptors (ptxas -v, sm_90a: 255
    registers and 468 bytes of spill stores against 160 and none)."""
    B, M, d = x.shape
    F, K = W_enc.shape[0], M * d
    if x.dtype == torch.float32:
        return None
    if not _launch.interpreted() and (x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9):
        return None
    size = x.element_size()
    flat = x.stride(2) == 1 and (M == 1 or x.stride(1) == d)
    if not flat or min(B, F, K) == 0 or W_enc.stride(2) != 1 or W_enc.stride(1) != d or W_enc.stride(0) != K:
        return None
    if (x.stride(0) * size) % 16 or (K * size) % 16 or x.data_ptr() % 16 or W_enc.data_ptr() % 16:
        return None
    x2 = x.as_strided((B, K), (x.stride(0), 1))
    W2 = W_enc.as_strided((F, K), (K, 1))
    # placeholder tiles: each config's pre_hook sets its own
    return TensorDescriptor.from_tensor(x2, [16, 16]), TensorDescriptor.from_tensor(W2, [16, 16])


def paired_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """Launch the paired encoder: f [B, F] in x's dtype (fp32 accumulation); the pre-activations when not relu."""
    B, M, d = x.shape
    F = W_enc.shape[0]
    if x.stride(2) != 1:
        x = x.contiguous()  # the feature axis must be unit-stride (the data layout); others are free
    W_enc, b_enc = W_enc.contiguous(), b_enc.contiguous()
    f = torch.empty(B, F, dtype=x.dtype, device=x.device)
    K = M * d
    flat = M == 1 or x.stride(1) == d

    ieee = x.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(F, meta["BLOCK_F"]),)

    if B == 0:
        return f
    descs = descriptors(x, W_enc)
    x_arg, W_arg = descs if descs is not None else (x, W_enc)
    args = (x_arg, W_arg, b_enc, f, B, F, K, d, x.stride(0), x.stride(1), batch_bucket(B))
    pinned = pinned_config(ieee)
    if pinned is None:
        _encode_autotuned[grid](*args, FLAT=flat, IEEE=ieee, DESC=descs is not None, RELU=relu)
    else:
        _descriptor_blocks(dict(x_ptr=x_arg, W_ptr=W_arg, **pinned.kwargs))
        _encode_kernel[grid](
            *args,
            FLAT=flat,
            IEEE=ieee,
            DESC=descs is not None,
            RELU=relu,
            EVEN_K=even_k(K, pinned.kwargs["BLOCK_K"]),
            **pinned.kwargs,
            num_warps=pinned.num_warps,
            num_stages=pinned.num_stages,
        )
    return f
