"""distributed.train on gloo: 2 and 4 processes spawned by the test, on meshes of latent shards x data replicas,
must give the weights (and logged statistics) of cx.train in one process on the same data, to float rounding:
after one step whose top-k boundary is a tie spread over several ranks, after short runs with dead latents (the
sharded aux loss), for the L1 crosscoder, and across checkpoints written by one layout and resumed by another."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crossdiff_ext as cx
from crossdiff_ext import distributed

D_MODEL, F, K, ROWS = 8, 42, 3, 480  # F = 42 over 4 shards: 11, 11, 10, 10 latents


def quantized_case(seed):
    """Small-integer activations and half-integer encoder rows: the codes f take few distinct values, and with
    unit decoder rows every w_j = 2, so the batch's K-th score is tied many times over."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (ROWS, 2, D_MODEL), generator=g).float()
    cc = cx.CrossCoder(D_MODEL, F, 2, k=K, threshold_start_step=2)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randint(-1, 2, (F, 2, D_MODEL), generator=g).float() / 2)
        cc.W_dec.copy_(torch.randn(F, 2, D_MODEL, generator=g))
        cc.W_dec.div_(cc.W_dec.norm(dim=2, keepdim=True))
    return cc, x


def random_case(seed, activation="batch_topk", partition=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, 2, D_MODEL, generator=g) * torch.tensor([1.0, 3.0])[None, :, None] + 0.5
    torch.manual_seed(seed)
    cc = cx.CrossCoder(
        D_MODEL,
        F,
        2,
        k=K if activation == "batch_topk" else None,
        activation=activation,
        threshold_start_step=2,
        target_rms=1.0,
        partition=partition,
    )
    return cc, x


CASES = {
    "quantized": quantized_case,
    "random": random_case,
    "relu": lambda s: random_case(s, "relu"),
    # Dedicated latents: base [0, 7), chat [7, 27); 2 shards split the chat block, 4 shards (11, 11, 10, 10) give
    # every kind of shard (base and chat, chat only, chat and shared, shared only).
    "partitioned": lambda s: random_case(s, partition=(7, 20)),
}


def config(steps, **overrides):
    base = dict(
        steps=steps, batch_size=48, lr=3e-3, warmup_steps=2, dead_tokens=48, progress=False, log_every=1, seed=5
    )
    base.update(overrides)
    return cx.TrainConfig(**base)


def _worker(rank, world, init, latent, case, seed, steps, overrides, resume, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cc, x = CASES[case](seed)
        mesh = distributed.make_mesh(latent)
        model = distributed.ShardedCrossCoder.from_crosscoder(cc, mesh)
        result = distributed.train(model, x, config(steps, log_path=out + ".jsonl", **overrides), resume=resume)
        full = model.gather()
        if rank == 0:
            torch.save(dict(state=full.state_dict(), last=result.last, log=read_log(out + ".jsonl")), out)
    finally:
        dist.destroy_process_group()


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_sharded(tmp_path, world, latent, case, seed, steps, resume=False, **overrides):
    out = str(tmp_path / f"sharded-{world}-{latent}-{steps}.pt")
    init = f"file://{tmp_path / f'rendezvous-{world}-{latent}-{steps}-{resume}'}"
    mp.spawn(_worker, args=(world, init, latent, case, seed, steps, overrides, resume, out), nprocs=world, join=True)
    return torch.load(out)


def run_single(tmp_path, case, seed, steps, resume=False, **overrides):
    cc, x = CASES[case](seed)
    log = str(tmp_path / f"single-{case}-{steps}-{resume}.jsonl")
    result = cx.train(cc, x, config(steps, log_path=log, **overrides), resume=resume)
    return dict(state=cc.state_dict(), last=result.last, log=read_log(log))


def assert_same_run(sharded, single):
    for name, ref in single["state"].items():
        torch.testing.assert_close(sharded["state"][name], ref, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert sharded["last"] == sharded["log"][-1] and single["last"] == single["log"][-1]
    assert [r["step"] for r in sharded["log"]] == [r["step"] for r in single["log"]]
    for a, b in zip(sharded["log"], single["log"]):  # every step's statistics of the global batch
        assert a["delta_norm_bands"] == b["delta_norm_bands"]
        for key in ("loss", "reconstruction", "fve", "l0", "dead_fraction", "threshold", "aux", "l1", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def _shard_of(j, G):
    return next(r for r in range(G) if distributed.latent_range(F, r, G)[0] <= j < distributed.latent_range(F, r, G)[1])


TIE_SEED = 22  # found by search: the premise below holds for it


def test_quantized_first_batch_ties_across_ranks():
    """The premise of the tie tests: at step 1 the K-th score is tied, and in the row where the kept ties run out
    (in the second half of the batch, i.e. on data rank 1 of 2) a kept tie and a dropped tie lie in different
    latent shards, for 2 and for 4 shards: the lower-flat-index rule across ranks decides which latent learns."""
    cc, x = quantized_case(TIE_SEED)
    batch = cx.data.as_batches(x, 48, seed=5).next()
    with torch.no_grad():  # b_enc = 0; init_b_dec="zero" keeps b_dec out of step 1
        s = torch.relu(batch.reshape(48, -1) @ cc.W_enc.reshape(F, -1).T) * cc.decoder_norm_weights()
    t = torch.sort(s.flatten(), descending=True).values[K * 48 - 1]
    tie = s == t
    need = K * 48 - int((s > t).sum())
    assert t > 0 and 0 < need < int(tie.sum())
    row, col = divmod(int(torch.nonzero(torch.cumsum(tie.flatten().long(), 0) == need)[0]), F)
    assert row >= 24
    ties = torch.nonzero(tie[row]).flatten().tolist()
    kept, dropped = [j for j in ties if j <= col], [j for j in ties if j > col]
    for G in (2, 4):
        assert kept and {_shard_of(j, G) for j in dropped} - {_shard_of(j, G) for j in kept}


# b_dec starts at the geometric median of the batch; with init_b_dec="zero" the quantized codes of step 1 are
# exactly those checked above.
@pytest.mark.parametrize(
    "world,latent",
    [(2, 2), (4, 4), (4, 2), (2, 1)],
    ids=["2 latent shards", "4 latent shards", "2x2 mesh", "2 data replicas"],
)
def test_one_step_with_boundary_ties_equals_one_process(tmp_path, world, latent):
    sharded = run_sharded(tmp_path, world, latent, "quantized", TIE_SEED, 1, init_b_dec="zero")
    assert_same_run(sharded, run_single(tmp_path, "quantized", TIE_SEED, 1, init_b_dec="zero"))


@pytest.mark.parametrize(
    "world,latent,case",
    [(4, 4, "quantized"), (4, 2, "random"), (2, 1, "random"), (4, 2, "relu")],
    ids=["4 latent shards, ties", "2x2 mesh, normalised", "2 data replicas", "2x2 mesh, L1"],
)
def test_short_run_equals_one_process(tmp_path, world, latent, case):
    sharded = run_sharded(tmp_path, world, latent, case, 4, 8)
    single = run_single(tmp_path, case, 4, 8)
    if case != "relu":
        # latents died (dead_tokens = 1 batch) and the aux loss trained them; the threshold was tracked
        assert sum(r["aux"] > 0 for r in single["log"]) >= 3
        assert float(single["state"]["threshold"]) > 0
    assert_same_run(sharded, single)


def test_checkpoints_cross_layouts(tmp_path):
    """A 2x2 run's sharded checkpoint resumes in one process, and that run's checkpoint resumes on 4 latent
    shards: both equal 8 straight steps in one process. CrossCoder.from_pretrained merges the shards. The
    crosscoder has dedicated latents, so each shard saves, checks and resumes its own part of the partition."""
    ckpt = str(tmp_path / "run")
    run_sharded(tmp_path, 4, 2, "partitioned", 4, 3, checkpoint_dir=ckpt)
    step3 = os.path.join(ckpt, "step-00000003")
    assert distributed.is_sharded(step3)
    assert sorted(os.listdir(step3)) == ["shard-000-of-002", "shard-001-of-002", "sharding.json", "trainer.pt"]
    shards = [cx.CrossCoder.from_pretrained(os.path.join(step3, f"shard-00{r}-of-002")) for r in range(2)]
    assert [s.partition for s in shards] == [(7, 14), (0, 6)]
    merged = cx.CrossCoder.from_pretrained(step3)
    assert merged.partition == (7, 20)
    three = run_single(tmp_path, "partitioned", 4, 3)
    for name, ref in three["state"].items():
        torch.testing.assert_close(merged.state_dict()[name], ref, rtol=1e-4, atol=2e-5)
    cc, x = CASES["partitioned"](4)
    cx.train(cc, x, config(8, checkpoint_dir=ckpt), resume=True, until=5)
    assert not distributed.is_sharded(os.path.join(ckpt, "step-00000005"))
    resumed = run_sharded(tmp_path, 4, 4, "partitioned", 4, 8, resume=True, checkpoint_dir=ckpt)
    straight = run_single(tmp_path, "partitioned", 4, 8)
    resumed["log"] = straight["log"][:5] + resumed["log"]  # the resumed run logged steps 6..8
    assert_same_run(resumed, straight)
    for name in ("W_enc", "W_dec"):  # exactly zero after sharded steps, not merely close to the one-process run
        W = resumed["state"][name]
        assert bool((W[:7, 1] == 0).all() and (W[7:27, 0] == 0).all()), name
        assert bool((W[:7, 0] != 0).any(-1).all() and (W[7:27, 1] != 0).any(-1).all()), name


def test_cli_train_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 4 -m crossdiff_ext train --latent-parallel 2` (a 2 x 2 mesh) on a store writes
    sharded checkpoints equal to those of `crossdiff train` in one process."""
    import subprocess
    import sys

    from crossdiff_ext import cli
    from crossdiff_ext.data.store import StoreWriter

    _, x = random_case(6)
    with StoreWriter(tmp_path / "store", 2, D_MODEL, dtype="float32", shard_rows=200) as w:
        w.append(x)
    common = [
        "train",
        "--store",
        str(tmp_path / "store"),
        "--dict-size",
        str(F),
        "-k",
        str(K),
        "--steps",
        "4",
        "--batch-size",
        "48",
        "--lr",
        "3e-3",
        "--checkpoint-every",
        "2",
        "--target-rms",
        "1",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            "-m",
            "crossdiff_ext",
            *common,
            "--out",
            str(tmp_path / "sharded"),
            "--latent-parallel",
            "2",
        ],
        check=True,
        env=env,
        timeout=300,
    )
    assert cli.main(common + ["--out", str(tmp_path / "single")]) == 0
    for step in ("step-00000002", "step-00000004"):
        assert distributed.is_sharded(tmp_path / "sharded" / step)
        sharded = cx.CrossCoder.from_pretrained(tmp_path / "sharded" / step).state_dict()
        single = cx.CrossCoder.from_pretrained(tmp_path / "single" / step).state_dict()
        for name, ref in single.items():
            torch.testing.assert_close(sharded[name], ref, rtol=1e-4, atol=2e-5, msg=lambda m: f"{step} {name}: {m}")


def test_cli_latent_parallel_needs_torchrun(capsys):
    from crossdiff_ext import cli

    argv = ["train", "--store", "nowhere", "--out", "nowhere", "--dict-size", "8", "--latent-parallel", "2"]
    assert cli.main(argv) == 2
    assert "need a torchrun launch" in capsys.readouterr().err


def _count_worker(rank, world, init, latent, dead_tokens, out):
    """Payload bytes of every collective, per (group, kind), of train steps 1..n for n = 1 and 2."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = distributed.make_mesh(latent)
        counted = {}
        originals = dist.all_reduce, dist.all_gather

        def group_name(group):
            return "latent" if group is mesh.latent_group else "data" if group is mesh.data_group else repr(group)

        def all_reduce(t, *args, group=None, **kwargs):
            key = (group_name(group), "all_reduce")
            counted[key] = counted.get(key, 0) + t.numel() * t.element_size()
            return originals[0](t, *args, group=group, **kwargs)

        def all_gather(parts, t, *args, group=None, **kwargs):
            key = (group_name(group), "all_gather")
            counted[key] = counted.get(key, 0) + sum(p.numel() * p.element_size() for p in parts)
            return originals[1](parts, t, *args, group=group, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        totals = []
        try:
            for until in (1, 2):
                counted.clear()
                cc, x = random_case(7)
                model = distributed.ShardedCrossCoder.from_crosscoder(cc, mesh)
                distributed.train(model, x, config(10, log_every=100, dead_tokens=dead_tokens), until=until)
                totals.append(dict(counted))
        finally:
            dist.all_reduce, dist.all_gather = originals
        if rank == 0:
            torch.save(totals, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dead_tokens", [10**9, 0], ids=["no dead latents", "all latents dead"])
def test_collective_bytes_match_the_scaling_model(tmp_path, dead_tokens):
    """kernels_bench.scaling.collective_bytes (the README's scaling note) counts what a real step sends."""
    from kernels_bench.scaling import collective_bytes

    out = str(tmp_path / "counts.pt")
    mp.spawn(_count_worker, args=(4, f"file://{tmp_path / 'rendezvous'}", 2, dead_tokens, out), nprocs=4, join=True)
    one, two = torch.load(out)
    step2 = {key: two[key] - one.get(key, 0) for key in two if two[key] - one.get(key, 0)}
    expected = collective_bytes(48, 2, D_MODEL, F, 2, 2, elt=4, dead=dead_tokens == 0, k_aux=D_MODEL // 2)
    assert step2 == expected
