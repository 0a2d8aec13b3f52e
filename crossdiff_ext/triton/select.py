"""Triton batch-wide selection: exact batch top-K (radix select + ordered compaction) and threshold_select.

Reference: crossdiff_ext/ops/select.py (batch_topk_reference, threshold_select_reference).

Scores s = f * w are ranked through order-preserving uint32 keys (the rule of csrc/score_key.h: -0 == +0, NaN
highest), so ties follow one rule everywhere: among equal keys the lower flat index b * F + j wins.

batch_topk never sorts and never syncs with the host:
  1. RADIX_PASSES histogram passes over [B, F] (8-bit digits, high to low), each counting only the entries whose
     higher digits equal the boundary prefix found so far; a one-program kernel after each pass finds the digit
     bin that holds the K-th largest key and records (prefix, shift, need = how many of the boundary prefix are
     still to take). A pass whose boundary bin is taken whole sets `done` and the later passes return at once.
  2. A count pass: per chunk of the flat range, the entries above the boundary prefix and those equal to it.
  3. An exclusive scan of those counts (torch.cumsum over the chunks), then one ordered write: every chunk
     knows where its selected entries go and how many boundary ties came before it, so the output is in CSR
     order (row, then latent) with exactly K entries; rows counts go to row_ptr with integer atomics.
The work is split into "tiles" (one row, BLOCK consecutive latents) so the latent id of an entry is a column
offset, never a 64-bit division; flat offsets are int64 (B * F may exceed 2^32).
"""

import math

import torch
import triton
import triton.language as tl

from ..ops import csr
from . import _launch

RADIX_BITS = 8  # 256 bins: Triton's histogram lowering costs grow with the bin count
RADIX_PASSES = 32 // RADIX_BITS
STATE_PREFIX, STATE_SHIFT, STATE_NEED, STATE_DONE = range(4)


@triton.jit
def _score_keys(f_ptr, w_ptr, row, col0, F, BLOCK: tl.constexpr):
    """Scores and order-preserving uint32 keys of one tile: row `row`, latents col0 .. col0 + BLOCK."""
    cols = col0 + tl.arange(0, BLOCK)
    inside = cols < F
    f = tl.load(f_ptr + row * F + cols, mask=inside, other=0.0)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    s = f.to(tl.float32) * w
    # The two zeros share a key. A select, not `s + 0.0`: the compiler may contract the multiply and that add
    # into one FMA, which keeps the sign of an underflowed negative product (-0).
    s = tl.where(s == 0.0, 0.0, s)
    u = s.to(tl.uint32, bitcast=True)
    flip = (u.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True) | 0x80000000
    key = tl.where(s != s, 0xFFFFFFFF, u ^ flip)
    return f, s, key, cols, inside


@triton.jit
def _histogram_kernel(
    f_ptr,
    w_ptr,
    state_ptr,
    hist_ptr,
    F,
    n_col_tiles,
    n_tiles,
    tiles_per_chunk,
    PASS: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    NBINS: tl.constexpr = 1 << RADIX_BITS
    DIGIT_SHIFT: tl.constexpr = 32 - (PASS + 1) * RADIX_BITS
    done = tl.load(state_ptr + 3)
    if done == 0:
        prefix = tl.load(state_ptr + 0)
        t0 = tl.program_id(0).to(tl.int64) * tiles_per_chunk
        t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
        counts = tl.zeros((NBINS,), dtype=tl.int32)
        for t in range(t0, t1):
            row = t // n_col_tiles
            _, _, key, _, inside = _score_keys(f_ptr, w_ptr, row, (t % n_col_tiles) * BLOCK, F, BLOCK)
            take = inside
            if PASS > 0:  # only the entries that share the boundary prefix of the higher digits
                take = take & ((key >> (DIGIT_SHIFT + RADIX_BITS)).to(tl.int64) == prefix)
            digit = ((key >> DIGIT_SHIFT) & (NBINS - 1)).to(tl.int32)
            counts += tl.histogram(digit, NBINS, mask=take)
        tl.atomic_add(hist_ptr + tl.arange(0, NBINS), counts.to(tl.int64))


@triton.jit
def _resolve_kernel(state_ptr, hist_ptr, PASS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """One program: the digit bin holding the need-th largest remaining key becomes part of the prefix."""
    NBINS: tl.constexpr = 1 << RADIX_BITS
    done = tl.load(state_ptr + 3)
    if done == 0:
        prefix = tl.load(state_ptr + 0)
        need = tl.load(state_ptr + 2)
        bins = tl.arange(0, NBINS)
        counts = tl.load(hist_ptr + bins)
        above = tl.sum(counts, 0) - tl.cumsum(counts, 0)  # entries in higher bins
        boundary = (above < need) & (above + counts >= need)  # exactly one bin (empty bins never qualify)
        b = tl.max(tl.where(boundary, bins, -1), 0)
        above_b = tl.sum(tl.where(bins == b, above, 0), 0)
        count_b = tl.sum(tl.where(bins == b, counts, 0), 0)
        need = need - above_b
        tl.store(state_ptr + 0, prefix * NBINS + b)
        tl.store(state_ptr + 1, tl.full((), 32 - (PASS + 1) * RADIX_BITS, dtype=tl.int64))
        tl.store(state_ptr + 2, need)
        if PASS == 32 // RADIX_BITS - 1:  # every bit resolved: the remaining ties are exact key ties
            tl.store(state_ptr + 3, tl.full((), 1, dtype=tl.int64))
        else:
            tl.store(state_ptr + 3, (count_b == need).to(tl.int64))


@triton.jit
def _classify(s, key, inside, state_ptr, theta, TOPK: tl.constexpr):
    """(above, tie): selected outright, and (top-k only) tied with the boundary prefix."""
    if TOPK:
        prefix = tl.load(state_ptr + 0)
        shift = tl.load(state_ptr + 1).to(tl.uint32)
        high = (key >> shift).to(tl.int64)
        above = inside & (high > prefix)
        tie = inside & (high == prefix)
    else:
        above = inside & ((s > theta) | (s != s))  # a NaN score is selected (it ranks highest)
        tie = inside & (s != s) & (s == s)  # never: threshold selection has no boundary ties
    return above, tie


@triton.jit
def _count_kernel(
    f_ptr,
    w_ptr,
    state_ptr,
    above_ptr,
    ties_ptr,
    theta,
    F,
    n_col_tiles,
    n_tiles,
    tiles_per_chunk,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t0 = tl.program_id(0).to(tl.int64) * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    n_above = tl.zeros((), dtype=tl.int64)
    n_ties = tl.zeros((), dtype=tl.int64)
    for t in range(t0, t1):
        row = t // n_col_tiles
        _, s, key, _, inside = _score_keys(f_ptr, w_ptr, row, (t % n_col_tiles) * BLOCK, F, BLOCK)
        above, tie = _classify(s, key, inside, state_ptr, theta, TOPK)
        n_above += tl.sum(above.to(tl.int64), 0)
        n_ties += tl.sum(tie.to(tl.int64), 0)
    tl.store(above_ptr + tl.program_id(0), n_above)
    tl.store(ties_ptr + tl.program_id(0), n_ties)


@triton.jit
def _write_kernel(
    f_ptr,
    w_ptr,
    state_ptr,
    above_before_ptr,
    ties_before_ptr,
    values_ptr,
    indices_ptr,
    row_count_ptr,
    theta,
    F,
    n_col_tiles,
    n_tiles,
    tiles_per_chunk,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    t0 = chunk.to(tl.int64) * tiles_per_chunk
    t1 = tl.minimum(t0 + tiles_per_chunk, n_tiles)
    if TOPK:
        need = tl.load(state_ptr + 2)
    else:
        need = tl.zeros((), dtype=tl.int64)
    tie_rank = tl.load(ties_before_ptr + chunk)
    pos = tl.load(above_before_ptr + chunk) + tl.minimum(tie_rank, need)
    for t in range(t0, t1):
        row = t // n_col_tiles
        f, s, key, cols, inside = _score_keys(f_ptr, w_ptr, row, (t % n_col_tiles) * BLOCK, F, BLOCK)
        above, tie = _classify(s, key, inside, state_ptr, theta, TOPK)
        tie_i = tie.to(tl.int64)
        ranks = tie_rank + tl.cumsum(tie_i, 0) - tie_i  # global rank among the boundary ties, in flat order
        chosen = (above | (tie & (ranks < need))).to(tl.int64)
        slot = pos + tl.cumsum(chosen, 0) - chosen
        keep = chosen != 0
        # entries kept with a non-positive score carry 0 (docs/math.md, "BatchTopK crosscoder": no gradient
        # reaches them); NaN keeps f
        if TOPK:
            f = tl.where(s <= 0, 0.0, f)
        tl.store(values_ptr + slot, f, mask=keep)
        tl.store(indices_ptr + slot, cols.to(indices_ptr.dtype.element_ty), mask=keep)
        n = tl.sum(chosen, 0)
        if n > 0:
            tl.atomic_add(row_count_ptr + row, n)
        pos += n
        tie_rank += tl.sum(tie_i, 0)


def _tiling(B, F, device):
    block = _launch.select_block(F)
    n_col_tiles = triton.cdiv(F, block)
    n_tiles = B * n_col_tiles
    tiles_per_chunk = triton.cdiv(n_tiles, _launch.target_programs(device))
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    return block, n_col_tiles, n_tiles, tiles_per_chunk, n_chunks


def _exclusive_scan(counts):
    out = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=out[1:])
    return out


def _compact(f, w, state, theta, nnz, topk, tiling):
    B, F = f.shape
    block, n_col_tiles, n_tiles, tiles_per_chunk, n_chunks = tiling
    values = torch.empty(nnz, dtype=f.dtype, device=f.device)
    indices = torch.empty(nnz, dtype=csr.index_dtype(F), device=f.device)
    row_counts = torch.zeros(B + 1, dtype=torch.int64, device=f.device)
    above, ties = state["above"], state["ties"]
    _write_kernel[(n_chunks,)](
        f,
        w,
        state["radix"],
        _exclusive_scan(above),
        _exclusive_scan(ties),
        values,
        indices,
        row_counts[1:],
        theta,
        F,
        n_col_tiles,
        n_tiles,
        tiles_per_chunk,
        TOPK=topk,
        BLOCK=block,
        num_warps=_launch.select_warps(block),
    )
    return values, indices, torch.cumsum(row_counts, 0)


def batch_topk(
    f: torch.Tensor, w: torch.Tensor, K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the exact batch top-K: (values [K], indices [K], row_ptr [B+1], min_score), no host sync."""
    f, w = f.contiguous(), w.contiguous()
    B, F = f.shape
    tiling = _tiling(B, F, f.device)
    block, n_col_tiles, n_tiles, tiles_per_chunk, n_chunks = tiling
    warps = _launch.select_warps(block)
    # (prefix, shift, need, done), filled on the device: no sync, and no copy from pageable host memory, which a
    # CUDA graph capture (torch.compile mode="reduce-overhead") refuses.
    radix = torch.zeros(4, dtype=torch.int64, device=f.device)
    radix[1], radix[2] = 32, K
    hist = torch.empty(RADIX_PASSES, 1 << RADIX_BITS, dtype=torch.int64, device=f.device)
    hist.zero_()
    for p in range(RADIX_PASSES):
        _histogram_kernel[(n_chunks,)](
            f,
            w,
            radix,
            hist[p],
            F,
            n_col_tiles,
            n_tiles,
            tiles_per_chunk,
            PASS=p,
            RADIX_BITS=RADIX_BITS,
            BLOCK=block,
            num_warps=warps,
        )
        _resolve_kernel[(1,)](radix, hist[p], PASS=p, RADIX_BITS=RADIX_BITS, num_warps=4)
    above = torch.empty(n_chunks, dtype=torch.int64, device=f.device)
    ties = torch.empty(n_chunks, dtype=torch.int64, device=f.device)
    _count_kernel[(n_chunks,)](
        f, w, radix, above, ties, 0.0, F, n_col_tiles, n_tiles, tiles_per_chunk, TOPK=True, BLOCK=block, num_warps=warps
    )
    values, indices, row_ptr = _compact(f, w, dict(radix=radix, above=above, ties=ties), 0.0, K, True, tiling)
    # The smallest selected positive score: a K-sized reduction over the kept entries (exactly the kernel's s).
    scores = values.float() * w[indices]
    min_score = torch.where(scores > 0, scores, torch.full((), math.inf, device=f.device)).min()
    return values, indices, row_ptr, min_score


def threshold_select(f: torch.Tensor, w: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the threshold selection: (values [nnz], indices [nnz], row_ptr [B+1]); one host sync for nnz."""
    f, w = f.contiguous(), w.contiguous()
    # Scores are fp32, and so is theta on every backend: rounded here once, since Triton's interpreter would
    # compare against the unrounded Python float (a theta beyond fp32's range is inf, which no score exceeds).
    theta = float(torch.tensor(theta, dtype=torch.float32))
    B, F = f.shape
    if B * F == 0:  # no tiles to launch (and _tiling would divide by zero): empty codes, B + 1 zero row pointers
        return (
            f.new_empty(0),
            torch.empty(0, dtype=csr.index_dtype(F), device=f.device),
            torch.zeros(B + 1, dtype=torch.int64, device=f.device),
        )
    tiling = _tiling(B, F, f.device)
    block, n_col_tiles, n_tiles, tiles_per_chunk, n_chunks = tiling
    above = torch.empty(n_chunks, dtype=torch.int64, device=f.device)
    ties = torch.zeros(n_chunks, dtype=torch.int64, device=f.device)
    dummy = torch.zeros(4, dtype=torch.int64, device=f.device)
    _count_kernel[(n_chunks,)](
        f,
        w,
        dummy,
        above,
        ties,
        theta,
        F,
        n_col_tiles,
        n_tiles,
        tiles_per_chunk,
        TOPK=False,
        BLOCK=block,
        num_warps=_launch.select_warps(block),
    )
    nnz = int(above.sum())  # the output size is data-dependent: one host sync (inference path)
    return _compact(f, w, dict(radix=dummy, above=above, ties=ties), theta, nnz, False, tiling)
