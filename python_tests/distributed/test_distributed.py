"""Latent-parallel exact batch top-k on gloo: 2 and 4 processes spawned by the test, each holding a block of the
latents, must select exactly what one process selects on the whole matrix (ops.select's reference), including
batches whose top-k boundary is a tie spread over several ranks."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crossdiff_ext.ops.select import batch_topk_reference


def case(seed, B, F, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: the boundary is a tie across ranks
        f = torch.randint(0, 4, (B, F), generator=g).float() / 2
        w = torch.ones(F)
    elif kind == "zeros":  # K exceeds the positive scores: zero scores (and -0) fill the rest, by flat index
        f = torch.where(torch.rand(B, F, generator=g) < 0.05, torch.rand(B, F, generator=g), torch.zeros(B, F))
        f[0, ::3] = -0.0
        w = torch.rand(F, generator=g) + 0.5
    else:
        f = torch.rand(B, F, generator=g)
        w = torch.rand(F, generator=g) + 0.5
    return f, w


def _worker(rank, world, init, splits, seed, B, F, K, kind, out):
    from crossdiff_ext.distributed import batch_topk_sharded

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        f, w = case(seed, B, F, kind)
        lo = sum(splits[:rank])
        hi = lo + splits[rank]
        values, indices, row_ptr, min_score = batch_topk_sharded(f[:, lo:hi], w[lo:hi], K)
        rows = torch.repeat_interleave(torch.arange(B), row_ptr.diff())
        torch.save(dict(flat=rows * F + indices.long() + lo, values=values, min_score=min_score), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("splits", [[20, 20], [13, 9, 10, 8]], ids=["2 ranks", "4 ranks, unequal"])
@pytest.mark.parametrize("kind", ["ties", "zeros", "random"])
def test_sharded_batch_topk_equals_one_process(tmp_path, splits, kind):
    B, F, k = 37, 40, 5
    K = k * B if kind != "zeros" else 20 * B  # "zeros": far more than the ~5% positive scores
    seed = 11
    mp.spawn(
        _worker,
        args=(len(splits), f"file://{tmp_path / 'rendezvous'}", splits, seed, B, F, K, kind, str(tmp_path / "out")),
        nprocs=len(splits),
        join=True,
    )
    parts = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(len(splits))]
    flat = torch.cat([p["flat"] for p in parts])
    values = torch.cat([p["values"] for p in parts])
    order = torch.argsort(flat)
    f, w = case(seed, B, F, kind)
    ref_values, ref_indices, ref_row_ptr, ref_min = batch_topk_reference(f, w, K)
    ref_rows = torch.repeat_interleave(torch.arange(B), ref_row_ptr.diff())
    assert torch.equal(flat[order], ref_rows * F + ref_indices.long())
    assert torch.equal(values[order], ref_values)
    for p in parts:
        assert float(p["min_score"]) == float(ref_min) or (
            math.isinf(float(ref_min)) and math.isinf(float(p["min_score"]))
        )


def test_score_keys_order_like_the_scores():
    from crossdiff_ext.distributed import score_keys

    s = torch.tensor([-math.inf, -2.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, math.inf, math.nan])
    keys = score_keys(s)
    assert keys[3] == keys[4]  # -0 == +0
    assert torch.all(keys[1:3].diff() > 0) and torch.all(keys[4:].diff() > 0) and keys[0] < keys[1]
    assert int(keys[-1]) == 0xFFFFFFFF
