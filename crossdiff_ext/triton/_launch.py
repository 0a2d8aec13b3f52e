"""Launch geometry shared by the Triton kernels, and whether they run interpreted (TRITON_INTERPRET=1)."""

import functools
import os

import torch
import triton


def interpreted() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET=1): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device | str) -> int:
    """Programs for the streaming kernels: enough to fill the GPU several times, few where they run serially."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8  # the interpreter runs programs one after another: fewer, longer programs cost less
    return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def select_block(F: int) -> int:
    """Latents per tile of the selection kernels: one row segment, a power of two in [16, 2048]."""
    return max(16, min(2048, triton.next_power_of_2(F)))


def select_warps(block: int) -> int:
    """Warps per program of the selection kernels for tiles of `block` latents."""
    return 8 if block >= 2048 else 4


# Entries per step of the sparse kernels' loops: a [ENTRY_BLOCK, column block] tile of gathered rows. The
# interpreter pays per step, not per element: it takes larger steps.
ENTRY_BLOCK = 64 if interpreted() else 16
# Staged entries per step of batch_topk's per-tile kernels: a tile usually keeps a few of its latents. The
# interpreter takes a whole slab per step.
TILE_STEP = 2048 if interpreted() else 128


def row_block(D: int) -> int:
    """Columns of the [M * d] rows per program of the sparse decode and weight-gradient kernels."""
    return max(16, min(512, triton.next_power_of_2(D)))


# Latents per program of the weight gradient: each latent's index chain is loaded during the previous one's
# gathers, and once for its whole row instead of once per column block.
GRAD_LATENTS = 4


def grad_block(D: int, element_size: int) -> int:
    """Columns per step of the weight gradient's column loop: 512 bytes of a row (256 half, 128 fp32 columns),
    under the decoder's 512 columns because the prefetched index chain of the next latent holds registers too
    (ptxas -v, sm_90a, D a multiple of 16: bf16 96 registers at 256 columns, 153 at 512; fp32 93 at 128, 154 at
    256)."""
    return max(16, min(512 // element_size, triton.next_power_of_2(D)))


def dot_block(D: int) -> int:
    """Columns per step of the per-entry dot products (the loop covers all D)."""
    return max(16, min(256, triton.next_power_of_2(D)))
