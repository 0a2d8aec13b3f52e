"""The paired activation store: round trip, running statistics, resumable writes, corruption detection, and
shuffled batches that resume exactly."""

import os

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext.data.store import ActivationStore, StoreBatches, StoreWriter
from crossdiff_ext.errors import InputError, MissingInputError, OutputExistsError


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_round_trip_and_statistics(tmp_path, dtype, torch_dtype):
    g = rng(41)
    x = torch.randn(250, 2, 6, generator=g) * 3 + 1
    tokens = torch.randint(0, 1000, (250,), generator=g)
    with StoreWriter(tmp_path, 2, 6, dtype=dtype, shard_rows=100, info=dict(layer=13)) as w:
        w.append(x[:130], tokens[:130])
        w.append(x[130:], tokens[130:])
    store = ActivationStore(tmp_path)
    assert len(store) == 250 and [s["rows"] for s in store.meta["shards"]] == [100, 100, 50]
    assert store.meta["info"] == dict(layer=13)
    expected = x.to(torch_dtype)
    assert torch.equal(store[torch.arange(250)], expected)
    rows = torch.tensor([249, 3, 101, 3, 199, 200])
    assert torch.equal(store[rows], expected[rows])
    stored = expected.double()
    torch.testing.assert_close(store.mean.double(), stored.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(store.variance.double(), stored.var(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_writer_resumes_at_the_last_whole_shard(tmp_path):
    g = rng(42)
    x = torch.randn(300, 2, 4, generator=g)
    w = StoreWriter(tmp_path, 2, 4, dtype="float32", shard_rows=64)
    w.append(x[:150])  # two whole shards written; 22 rows pending when the "crash" happens
    del w
    assert len(ActivationStore(tmp_path)) == 128
    with pytest.raises(OutputExistsError, match="resume=True"):
        StoreWriter(tmp_path, 2, 4, dtype="float32")
    with pytest.raises(InputError, match="cannot resume"):
        StoreWriter(tmp_path, 2, 5, dtype="float32", resume=True)
    with StoreWriter(tmp_path, 2, 4, dtype="float32", resume=True) as w:
        w.append(x[128:])
    store = ActivationStore(tmp_path)
    assert len(store) == 300 and torch.equal(store[torch.arange(300)], x)


def test_corrupted_or_missing_shards_are_named(tmp_path):
    with StoreWriter(tmp_path, 2, 4, dtype="float16", shard_rows=10) as w:
        w.append(torch.randn(25, 2, 4))
    shard = tmp_path / "shard-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    with pytest.raises(InputError, match="shard-00001.bin has .* bytes.*truncated"):
        ActivationStore(tmp_path)
    os.unlink(shard)
    with pytest.raises(MissingInputError, match="shard-00001.bin listed in store.json is missing"):
        ActivationStore(tmp_path)
    with pytest.raises(MissingInputError, match="not an activation store"):
        ActivationStore(tmp_path / "nothing")
    with pytest.raises(InputError, match="non-finite"):
        StoreWriter(tmp_path / "b", 2, 4).append(torch.full((3, 2, 4), float("nan")))
    with pytest.raises(InputError, match="beyond the range of float16"):
        StoreWriter(tmp_path / "c", 2, 4, dtype="float16").append(torch.full((3, 2, 4), 1e5))
    StoreWriter(tmp_path / "d", 2, 4, info=dict(layer=3)).close()
    with pytest.raises(InputError, match=r"settings differ in \['layer'\]"):
        StoreWriter(tmp_path / "d", 2, 4, info=dict(layer=4), resume=True)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_store_batches_cover_each_epoch_and_resume_exactly(tmp_path, prefetch):
    x = torch.arange(200 * 2 * 3, dtype=torch.float32).reshape(200, 2, 3)
    with StoreWriter(tmp_path, 2, 3, dtype="float32", shard_rows=64) as w:
        w.append(x)
    store = ActivationStore(tmp_path)
    source = StoreBatches(store, 20, seed=5, window=50, prefetch=prefetch)
    epoch = torch.cat([source.next() for _ in range(10)])
    assert sorted(epoch[:, 0, 0].tolist()) == sorted(x[:, 0, 0].tolist())  # every row once per epoch
    assert not torch.equal(epoch, x)  # and shuffled
    more = [source.next() for _ in range(3)]
    state = source.state_dict()
    after = [source.next() for _ in range(4)]
    source.close()
    again = StoreBatches(store, 20, seed=5, window=50, prefetch=prefetch)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [again.next() for _ in range(4)]))
    again.close()
    assert len(more) == 3


def test_training_on_a_store_resumes_exactly(tmp_path):
    x = torch.randn(300, 2, 8, generator=rng(43))
    with StoreWriter(tmp_path / "store", 2, 8, dtype="float16", shard_rows=128) as w:
        w.append(x)
    store = ActivationStore(tmp_path / "store")
    cfg = lambda d: cx.TrainConfig(
        steps=10, batch_size=16, lr=3e-3, warmup_steps=2, checkpoint_dir=str(tmp_path / d), progress=False, log_every=5
    )
    torch.manual_seed(0)
    straight = cx.CrossCoder(8, 32, 2, k=2)
    cx.train(straight, store, cfg("a"))
    torch.manual_seed(0)
    first = cx.CrossCoder(8, 32, 2, k=2)
    cx.train(first, store, cfg("b"), until=4)
    resumed = cx.CrossCoder(8, 32, 2, k=2)
    cx.train(resumed, store, cfg("b"), resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_mixed_batches_keep_proportions_and_resume(tmp_path):
    web = torch.zeros(300, 2, 4)
    chat = torch.ones(200, 2, 4)
    with StoreWriter(tmp_path / "chat", 2, 4, dtype="float32", shard_rows=64) as w:
        w.append(chat)
    store = ActivationStore(tmp_path / "chat")
    mixed = cx.MixedBatches([(web, 0.75), (store, 0.25)], 16, seed=2)
    batch = mixed.next()
    assert batch.shape == (16, 2, 4) and int(batch[:, 0, 0].sum()) == 4  # 12 web rows, 4 chat rows
    for _ in range(5):
        mixed.next()
    state = mixed.state_dict()
    after = [mixed.next() for _ in range(3)]
    mixed.close()
    again = cx.MixedBatches([(web, 0.75), (store, 0.25)], 16, seed=2)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [again.next() for _ in range(3)]))
    again.close()
    with pytest.raises(InputError, match="sum to 1"):
        cx.MixedBatches([(web, 0.5), (store, 0.25)], 16)
    cc = cx.CrossCoder(4, 16, 2, k=2)
    with pytest.raises(InputError, match="batches of 16 rows, but batch_size = 32"):
        cx.train(cc, cx.MixedBatches([(web, 0.5), (store, 0.5)], 16), cx.TrainConfig(batch_size=32, progress=False))
    result = cx.train(
        cc,
        cx.MixedBatches([(web, 0.5), (store, 0.5)], 16),
        cx.TrainConfig(steps=3, batch_size=16, warmup_steps=1, progress=False),
    )
    assert result.steps == 3
