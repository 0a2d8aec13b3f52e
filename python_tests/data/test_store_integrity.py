"""Store integrity: per-file checksums written with every shard, size checks on every open, checksums recomputed
on request, a flipped byte found and named, stores that predate checksums reported as unchecked, corrupt
metadata named, and NaN / Inf refused on every read with the rows that hold them."""

import json
import zlib

import numpy as np
import pytest
import torch
from conftest import rng

from crossdiff_ext.data.store import ActivationStore, StoreBatches, StoreWriter, checksum, file_checksum
from crossdiff_ext.errors import InputError, MissingInputError


def _write(path, rows=70, shard_rows=32, dtype="float16", salt=0):
    g = rng(900 + salt)
    x = torch.randn(rows, 2, 4, generator=g)
    with StoreWriter(path, 2, 4, dtype=dtype, shard_rows=shard_rows) as w:
        w.append(x, token_ids=torch.randint(0, 50, (rows,), generator=g), positions=torch.arange(rows) % 11)
    return x


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_every_file_of_a_shard_gets_its_checksum(tmp_path):
    _write(tmp_path)
    meta = json.loads((tmp_path / "store.json").read_text())
    assert [len(s["checksums"]) for s in meta["shards"]] == [3, 3, 3]  # data, token ids, positions
    for shard in meta["shards"]:
        for name, recorded in shard["checksums"].items():
            data = (tmp_path / name).read_bytes()
            assert recorded == f"crc32:{zlib.crc32(data):08x}" == checksum(data) == file_checksum(tmp_path / name)
    checks = ActivationStore(tmp_path, verify=True).verify()
    assert [c.status for c in checks] == ["ok"] * 9
    assert [c.file for c in checks[:3]] == ["shard-00000.bin", "tokens-00000.npy", "positions-00000.npy"]


@pytest.mark.parametrize("name", ["shard-00001.bin", "tokens-00002.npy", "positions-00000.npy"])
def test_a_flipped_byte_is_found_and_named(tmp_path, name):
    x = _write(tmp_path)
    target = tmp_path / name
    _flip(target, target.stat().st_size - 3)  # the last values (past a .npy header)
    store = ActivationStore(tmp_path)  # sizes are unchanged: opening without verify still works
    if name.startswith("shard"):
        assert not torch.equal(store[torch.arange(70)], x.half())  # the flip is real
    with pytest.raises(InputError, match=rf"1 of 9 files fail their checksum: {name} \(store.json records crc32:"):
        ActivationStore(tmp_path, verify=True)
    bad = [c for c in store.verify() if c.status != "ok"]
    assert [(c.file, c.status) for c in bad] == [(name, "bad")] and "the file has crc32:" in bad[0].detail


def test_two_bad_shards_are_both_named(tmp_path):
    _write(tmp_path)
    for name in ("shard-00000.bin", "shard-00002.bin"):
        _flip(tmp_path / name, 5)
    with pytest.raises(InputError, match=r"2 of 9 files fail.*shard-00000\.bin.*shard-00002\.bin"):
        ActivationStore(tmp_path, verify=True)


def test_a_store_without_checksums_opens_and_is_reported_unchecked(tmp_path):
    x = _write(tmp_path)
    meta = json.loads((tmp_path / "store.json").read_text())
    for shard in meta["shards"]:  # a store written before checksums were recorded
        del shard["checksums"]
    (tmp_path / "store.json").write_text(json.dumps(meta))
    assert torch.equal(ActivationStore(tmp_path)[torch.arange(70)], x.half())
    with pytest.warns(UserWarning, match="9 of 9 files have no recorded checksum.*only their sizes were checked"):
        store = ActivationStore(tmp_path, verify=True)
    assert {c.status for c in store.verify()} == {"unchecked"}
    # resuming such a store keeps the old shards unchecked and checksums the new ones
    with StoreWriter(tmp_path, 2, 4, dtype="float16", shard_rows=32, resume=True) as w:
        w.append(torch.randn(40, 2, 4, generator=rng(901)))
    statuses = [c.status for c in ActivationStore(tmp_path).verify()]
    assert statuses == ["unchecked"] * 9 + ["ok"] * 2  # two new shards (32 and 8 rows), data only


def test_sizes_are_checked_on_every_open(tmp_path):
    _write(tmp_path)
    shard = tmp_path / "shard-00002.bin"
    shard.write_bytes(shard.read_bytes() + b"\0\0")  # overwritten with more bytes
    with pytest.raises(InputError, match=r"shard-00002\.bin has 98 bytes, store.json expects 6 rows x 16 bytes = 96"):
        ActivationStore(tmp_path)
    (tmp_path / "positions-00001.npy").unlink()
    with pytest.raises(MissingInputError, match=r"positions-00001\.npy listed in store.json is missing"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"format": "crossdiff-activation-store/1", "n_models": 2,', r"store\.json: not valid JSON"),
        ("[1, 2]", r"store\.json: unknown format 'list'"),
        ('{"format": "crossdiff-activation-store/1", "n_models": 2}', r"not a valid store record.*'d_model'"),
        (b"\xff\xfe\x00", r"store\.json: not a store's metadata \(not UTF-8"),
    ],
)
def test_corrupt_metadata_names_the_file(tmp_path, text, message):
    _write(tmp_path, rows=10)
    path = tmp_path / "store.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=message):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reads_refuse_nan_and_inf_naming_rows_and_shard(tmp_path, dtype):
    x = _write(tmp_path, dtype=dtype)
    store = ActivationStore(tmp_path)
    itemsize = np.dtype(store.np_dtype).itemsize
    shard = tmp_path / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    inf = {"float32": np.float32(np.inf), "float16": np.float16(np.inf)}
    for row, value in ((3, "nan"), (17, "inf")):  # rows 35 and 49 of the store
        if dtype == "bfloat16":
            bits = np.uint16(0x7FC0 if value == "nan" else 0x7F80).tobytes()
        else:
            bits = (np.array(np.nan, dtype=store.np_dtype) if value == "nan" else inf[dtype]).tobytes()
        at = (row * 8 + 5) * itemsize
        raw[at : at + itemsize] = bits
    shard.write_bytes(bytes(raw))
    store = ActivationStore(tmp_path)
    assert torch.equal(store[0:32].float(), x[:32].to(store.dtype).float())  # other shards still read
    with pytest.raises(
        InputError, match=r"2 of the 70 rows read hold NaN or Inf .*store rows \[35, 49\], in shard-00001"
    ):
        store[0:70]
    with pytest.raises(InputError, match=r"store rows \[49\]"):
        store[torch.tensor([49, 2])]
    batches = StoreBatches(store, 70, prefetch=0)
    with pytest.raises(InputError, match=r"batch 0 of epoch 0: .*store rows \[.*35.*\]"):
        batches.next()


def test_the_writer_names_non_finite_rows(tmp_path):
    x = torch.randn(12, 2, 4, generator=rng(902))
    x[4, 1, 2] = float("nan")
    x[9, 0, 0] = float("inf")
    w = StoreWriter(tmp_path, 2, 4, dtype="float32", shard_rows=8)
    w.append(torch.randn(5, 2, 4, generator=rng(903)))
    with pytest.raises(
        InputError,
        match=r"2 of the 12 rows to append hold non-finite activations .*: rows \[4, 9\] of models \[0, 1\]",
    ):
        w.append(x)
