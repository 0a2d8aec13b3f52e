"""Checkpoints: save_pretrained/from_pretrained round trips and atomicity; the paper's dictionary_learning format
(.pt, hub directory, bare .safetensors) converted to our layout and back; clear errors for what is unsupported."""

import json
import math
import os

import pytest
import safetensors.torch
import torch
from conftest import DTYPES, close, grid_tensor

import crossdiff_ext as cx
from crossdiff_ext import atomic
from crossdiff_ext.errors import InputError, MissingInputError
from crossdiff_ext.layer import checkpoints

D, F = 8, 24


def randomize(cc, threshold=None):
    """Fresh random parameters (never the structured init) and optionally a set inference threshold."""
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32))
        if threshold is not None:
            cc.threshold.fill_(threshold)
        cc.num_batches_tracked.fill_(int(torch.randint(0, 5000, ())))
    return cc


def make(activation="batch_topk", M=2, dtype=torch.float32, **kw):
    k = 4 if activation == "batch_topk" else None
    return randomize(cx.CrossCoder(D, F, M, k=k, activation=activation, dtype=dtype, **kw), threshold=0.7)


def assert_same(a, b):
    assert a.config() == b.config()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name  # bit for bit (no NaN in random params)


def paper_state(M=2, dtype=torch.float32, k=4, threshold=0.5, code_norm=1):
    """A hand-built dictionary_learning state dict: encoder [M, d, F], decoder [M, F, d]."""
    sd = {
        "encoder.weight": torch.randn(M, D, F).to(dtype),
        "encoder.bias": torch.randn(F).to(dtype),
        "decoder.weight": torch.randn(M, F, D).to(dtype),
        "decoder.bias": torch.randn(M, D).to(dtype),
    }
    if code_norm is not None:
        sd["code_normalization_id"] = torch.tensor(code_norm)
    if k is not None:
        sd["k"] = torch.tensor(k, dtype=torch.int32)
        sd["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    return sd


def assert_converted(cc, sd):
    M = sd["encoder.weight"].shape[0]
    assert (cc.n_models, cc.d_model, cc.dict_size) == (M, D, F)
    assert cc.W_enc.dtype == sd["encoder.weight"].dtype
    assert torch.equal(cc.W_enc, sd["encoder.weight"].permute(2, 0, 1))
    assert torch.equal(cc.W_dec, sd["decoder.weight"].permute(1, 0, 2))
    assert torch.equal(cc.b_enc, sd["encoder.bias"]) and torch.equal(cc.b_dec, sd["decoder.bias"])
    assert cc.W_enc.is_contiguous() and cc.W_dec.is_contiguous()
    assert not cc.training  # loaded for inference, like transformers' from_pretrained
    if "k" in sd:
        assert cc.activation == "batch_topk" and cc.k == int(sd["k"])
        assert torch.equal(cc.threshold, sd["threshold"])
    else:
        assert cc.activation == "relu" and cc.k is None


# ------------------------------------------------------------------------------------------ our own format


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_round_trip(tmp_path, activation, M, dtype):
    cc = make(activation, M, dtype, threshold_start_step=17, threshold_beta=0.9)
    cc.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "crossdiff_ext" and config["format_version"] == 3
    assert config["dtype"] == str(dtype).removeprefix("torch.")

    loaded = cx.CrossCoder.from_pretrained(tmp_path / "ckpt")
    assert_same(cc, loaded)
    assert all(p.is_contiguous() and p.requires_grad for p in loaded.parameters())
    assert not loaded.training  # eval mode: cc(x) uses the threshold and leaves it alone
    x = torch.randn(16, M, D).to(dtype)
    threshold = loaded.threshold.clone()
    b = loaded(x)
    assert torch.equal(loaded.threshold, threshold)
    cc.eval()
    a = cc(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.codes.to_dense(), b.codes.to_dense())
    if activation == "batch_topk":  # training mode: batch top-k, and the threshold tracking state carried over
        cc.train(), loaded.train()
        assert torch.equal(cc(x).recon, loaded(x).recon)
        assert torch.equal(cc.threshold, loaded.threshold)


def test_init_mode_is_saved(tmp_path):
    cc = make(init="shared")
    cc.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["init"] == "shared"
    assert cx.CrossCoder.from_pretrained(tmp_path).init == "shared"


def test_dtype_override_and_file_path(tmp_path):
    cc = make(dtype=torch.float32)
    checkpoints.save_pretrained(cc, tmp_path)
    for dtype in (torch.bfloat16, "float16"):
        loaded = checkpoints.from_pretrained(cx.CrossCoder, tmp_path / "model.safetensors", dtype=dtype)
        want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        assert loaded.W_enc.dtype == want and loaded.threshold.dtype == torch.float32
        assert torch.equal(loaded.W_dec, cc.W_dec.to(want))


@pytest.mark.parametrize("victim", ["save_file", "replace"])
def test_save_is_atomic(tmp_path, monkeypatch, victim):
    first = make()
    first.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if victim == "save_file":

        def half_written(tensors, path, metadata=None):  # leaves a partial file behind, then fails
            with open(path, "wb") as f:
                f.write(b"partial")
            boom()

        monkeypatch.setattr(checkpoints, "save_file", half_written)
    else:
        monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        make(M=3).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no temp files left
    assert_same(first, cx.CrossCoder.from_pretrained(tmp_path))


def test_saved_files_get_the_default_mode(tmp_path):
    make().save_pretrained(tmp_path)
    (tmp_path / "plain").write_text("")  # what open() creates under the current umask
    want = os.stat(tmp_path / "plain").st_mode
    assert all(os.stat(tmp_path / name).st_mode == want for name in ("config.json", "model.safetensors"))


def test_save_overwrites(tmp_path):
    make().save_pretrained(tmp_path)
    second = make("relu", M=3)
    second.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same(second, cx.CrossCoder.from_pretrained(tmp_path))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(MissingInputError, match="config.json"):
        cx.CrossCoder.from_pretrained(tmp_path)
    make().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "format"}))
    with pytest.raises(InputError, match="config.json.*not a crossdiff_ext checkpoint"):
        cx.CrossCoder.from_pretrained(tmp_path)
    config_path.write_text(json.dumps(dict(config, format_version=4)))
    with pytest.raises(InputError, match="format_version 4"):
        cx.CrossCoder.from_pretrained(tmp_path)
    config_path.write_text(json.dumps(dict(config, bogus=1)))
    with pytest.raises(InputError, match="bogus"):
        cx.CrossCoder.from_pretrained(tmp_path)
    config_path.write_text(json.dumps(dict(config, dict_size=F + 1)))
    with pytest.raises(InputError, match=r"W_enc has shape \(24, 2, 8\), expected \(25, 2, 8\)"):
        cx.CrossCoder.from_pretrained(tmp_path)

    config_path.write_text(json.dumps(config))
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    safetensors.torch.save_file(
        {k: v for k, v in tensors.items() if k != "b_dec"} | {"extra": torch.ones(1)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(InputError, match=r"missing keys \['b_dec'\], unexpected keys \['extra'\]"):
        cx.CrossCoder.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(MissingInputError, match="model.safetensors"):
        cx.CrossCoder.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ the paper's checkpoints


def reference_encode(sd, x, threshold):
    """The library's BatchTopKCrossCoder.encode(x, use_threshold=True) in plain math, in fp32."""
    enc, dec = sd["encoder.weight"].float(), sd["decoder.weight"].float()
    f = torch.relu(torch.einsum("bmd,mdf->bf", x.float(), enc) + sd["encoder.bias"].float())
    f = f.to(x.dtype).float()  # the encoder's output dtype is the input's
    w = dec.norm(dim=2).sum(0)
    return f * (f * w > threshold), f * w


def gap_threshold(scores):
    """A threshold in the middle of the widest gap among the positive scores, so that rounding cannot flip a
    comparison."""
    s = scores[scores > 0].sort().values
    lo, hi = len(s) // 5, 4 * len(s) // 5
    i = lo + int((s[lo + 1 : hi] - s[lo : hi - 1]).argmax())
    return float((s[i] + s[i + 1]) / 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 3])
def test_dictionary_learning_encode_matches_reference(M, dtype):
    # Grid values: fp32 products and sums are exact, so the library and the reference see the same f.
    sd = {
        "encoder.weight": grid_tensor((M, D, F), -8, 8, 16, dtype),
        "encoder.bias": grid_tensor((F,), -8, 8, 16, dtype),
        "decoder.weight": grid_tensor((M, F, D), -8, 8, 8, dtype),
        "decoder.bias": grid_tensor((M, D), -8, 8, 8, dtype),
        "k": torch.tensor(3, dtype=torch.int32),
    }
    x = grid_tensor((32, M, D), -8, 8, 8, dtype)
    _, scores = reference_encode(sd, x, 0.0)
    sd["threshold"] = torch.tensor(gap_threshold(scores))
    expected, _ = reference_encode(sd, x, float(sd["threshold"]))
    assert expected.count_nonzero() > 0 and (expected == 0).any()

    cc = cx.load_dictionary_learning(sd).eval()
    assert_converted(cc, sd)
    close(cc.encode(x).to_dense(), expected, dtype)


def save_pt(sd, path, compiled=False):
    torch.save({("_orig_mod." + k if compiled else k): v for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["dict", "pt", "pt_compiled", "hub", "hub_file", "bare_safetensors"])
@pytest.mark.parametrize("k", [4, None], ids=["batch_topk", "relu"])
def test_dictionary_learning_sources(tmp_path, kind, k, dtype):
    M = 3 if kind == "hub" else 2
    sd = paper_state(M=M, dtype=dtype, k=k, code_norm=None if kind == "pt" else 1)  # .pt: legacy, no enum id
    if kind == "dict":
        source = sd
    elif kind.startswith("pt"):
        source = save_pt(sd, tmp_path / "crosscoder.pt", compiled=kind == "pt_compiled")
    elif kind.startswith("hub"):
        safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
        config = dict(
            activation_dim=D,
            dict_size=F,
            num_layers=M,
            code_normalization="CROSSCODER",
            dict_class="BatchTopKCrossCoder" if k else "CrossCoder",
            norm_init_scale=1.0,
        )
        if k is not None:
            config["k"] = k
        (tmp_path / "config.json").write_text(json.dumps(config))
        source = tmp_path if kind == "hub" else tmp_path / "model.safetensors"
    else:
        source = tmp_path / "ae.safetensors"
        safetensors.torch.save_file(sd, source)
    cc = cx.load_dictionary_learning(source)
    assert_converted(cc, sd)
    if k is None:
        assert float(cc.threshold) == -1.0


def test_dictionary_learning_dtype_device_and_unused_normalizer():
    sd = paper_state()
    # What newer library versions save when no input normalisation was used: NaN statistics, unit scales.
    sd.update(
        target_rms=torch.tensor(1.0),
        activation_mean=torch.full((2, D), math.nan),
        activation_std=torch.full((2, D), math.nan),
        activation_global_scale=torch.ones(2),
    )
    cc = cx.load_dictionary_learning(sd, dtype=torch.bfloat16, device="cpu")
    assert cc.W_enc.dtype == torch.bfloat16 and cc.W_enc.device.type == "cpu"
    assert torch.equal(cc.W_enc, sd["encoder.weight"].permute(2, 0, 1).bfloat16())
    # The loaded model owns its storage: the caller's tensors are not aliased.
    with torch.no_grad():
        cc32 = cx.load_dictionary_learning(sd)
        cc32.b_enc.add_(1)
    assert not torch.equal(cc32.b_enc, sd["encoder.bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_to_dictionary_learning_round_trip(tmp_path, activation, M, dtype):
    cc = make(activation, M, dtype)
    cc.num_batches_tracked.zero_()  # not part of the paper's format, nor is the threshold of an L1 crosscoder
    if activation == "relu":
        cc.threshold.fill_(-1.0)
    sd = cx.to_dictionary_learning(cc)
    expected = {
        "encoder.weight": (M, D, F),
        "encoder.bias": (F,),
        "decoder.weight": (M, F, D),
        "decoder.bias": (M, D),
        "code_normalization_id": (),
    }
    if activation == "batch_topk":
        expected |= {"k": (), "threshold": ()}
        assert sd["k"].dtype == torch.int32 and sd["threshold"].dtype == torch.float32
    assert {name: tuple(t.shape) for name, t in sd.items()} == expected
    assert all(t.is_contiguous() for t in sd.values())
    assert int(sd["code_normalization_id"]) == 1 and sd["code_normalization_id"].dtype == torch.int64
    assert_same(cc, cx.load_dictionary_learning(sd))
    assert_same(cc, cx.load_dictionary_learning(save_pt(sd, tmp_path / "export.pt")))
    assert_same(cc, cx.load_dictionary_learning(cx.to_dictionary_learning(cc, normalizer_buffers=True)))
    with torch.no_grad():
        sd["encoder.weight"].add_(1)  # an export is a copy, not a view of the module
    assert_same(cc, cx.load_dictionary_learning(cx.to_dictionary_learning(cc)))


def with_(sd, **changes):
    out = dict(sd)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(code_normalization_id=torch.tensor(3)), "code_normalization_id = MIXED"),
        (dict(code_normalization_id=torch.tensor(5)), "DECOUPLED"),
        (dict(threshold=torch.full((2,), 0.5)), r"threshold has shape \(2,\).*DECOUPLED"),
        (
            dict(
                encoder__weight=torch.randn(1, D, F),
                decoder__weight=torch.randn(1, F, D),
                decoder__bias=torch.randn(1, D),
            ),
            r"num_layers \(M\) = 1",
        ),
        (dict(encoder__weight=torch.randn(D, F)), r"encoder.weight has shape \(8, 24\), expected rank 3"),
        (
            dict(decoder__weight=torch.randn(2, F + 1, D)),
            r"decoder.weight has shape \(2, 25, 8\), expected \(2, 24, 8\)",
        ),
        (dict(encoder__bias=torch.randn(F - 1)), r"encoder.bias has shape \(23,\), expected \(24,\)"),
        (dict(decoder__bias=torch.randn(3, D)), r"decoder.bias has shape \(3, 8\), expected \(2, 8\)"),
        (dict(decoder__bias=None), r"missing tensors \['decoder.bias'\]"),
        (dict(W_aux=torch.randn(3)), r"unknown keys \['W_aux'\]"),
        (dict(k=torch.tensor([1, 2])), r"k must be a scalar tensor, got \(2,\)"),
        (dict(k=torch.tensor(F + 1)), "k must be an int in"),
        (
            dict(activation_mean=torch.randn(2, D + 1), activation_std=torch.rand(2, D + 1) + 0.5),
            r"activation_mean has shape \(2, 9\), expected \(2, 8\)",
        ),
    ],
)
def test_dictionary_learning_errors(changes, match):
    with pytest.raises(InputError, match=match):
        cx.load_dictionary_learning(with_(paper_state(), **changes))


@pytest.mark.parametrize(
    "config_changes, match",
    [
        (dict(code_normalization="MIXED"), "code_normalization = 'MIXED'"),
        (dict(dict_size=F * 2), "dict_size = 48 but the tensors give 24"),
        (dict(num_layers=3), "num_layers = 3 but the tensors give 2"),
        (dict(activation_dim=D + 1), "activation_dim = 9 but the tensors give 8"),
        (dict(k=7), "k = 7 but the k tensor is 4"),
    ],
)
def test_dictionary_learning_hub_config_errors(tmp_path, config_changes, match):
    safetensors.torch.save_file(paper_state(), tmp_path / "model.safetensors")
    config = dict(activation_dim=D, dict_size=F, num_layers=2, k=4, code_normalization="CROSSCODER")
    (tmp_path / "config.json").write_text(json.dumps(config | config_changes))
    with pytest.raises(InputError, match=match):
        cx.load_dictionary_learning(tmp_path)


def test_dictionary_learning_file_errors(tmp_path):
    with pytest.raises(MissingInputError, match="model.safetensors"):
        cx.load_dictionary_learning(tmp_path)
    with pytest.raises(MissingInputError, match="nope.pt"):
        cx.load_dictionary_learning(tmp_path / "nope.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(InputError, match="list.pt: expected a state dict, got list"):
        cx.load_dictionary_learning(tmp_path / "list.pt")
    (tmp_path / "damaged.pt").write_bytes(b"PK\x03\x04 not a zip archive")
    with pytest.raises(InputError, match="damaged.pt: not a readable torch.save file"):
        cx.load_dictionary_learning(tmp_path / "damaged.pt")
    safetensors.torch.save_file(paper_state(), tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.safetensors: not a readable safetensors file"):
        cx.load_dictionary_learning(tmp_path / "cut.safetensors")
    make().save_pretrained(tmp_path / "ours")  # our format handed to the wrong loader
    with pytest.raises(InputError, match="CrossCoder.from_pretrained"):
        cx.load_dictionary_learning(tmp_path / "ours")
    paper = tmp_path / "paper"  # the paper's format handed to ours is recognised and loaded as the paper's
    paper.mkdir()
    safetensors.torch.save_file(paper_state(), paper / "model.safetensors")
    (paper / "config.json").write_text(json.dumps(dict(activation_dim=D, dict_size=F, num_layers=2)))
    assert_same(cx.load_dictionary_learning(paper), cx.CrossCoder.from_pretrained(paper))
