"""Input normalisation (target_rms): the map, its inverse inside encode/decode/forward, its statistics from the
data in cx.train, saving it with the model, and the paper code's normaliser buffers."""

import json

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext.data.store import StoreWriter
from crossdiff_ext.errors import InputError

D, F = 8, 32


def skewed_data(n=400, seed=41):
    """Paired activations whose models differ in scale by 100x and in mean: an unnormalised loss would see only
    model 1."""
    g = rng(seed)
    x = torch.randn(n, 2, D, generator=g)
    x[:, 1] = x[:, 1] * 100 + 30
    x[:, 0] = x[:, 0] * torch.linspace(0.5, 2.0, D) - 3
    return x


def normalized_cc(seed=0, **kwargs):
    torch.manual_seed(seed)
    return cx.CrossCoder(D, F, 2, k=3, target_rms=1.0, threshold_start_step=2, **kwargs)


def test_normaliser_gives_target_rms_per_model():
    x = skewed_data()
    cc = cx.CrossCoder(D, F, 2, k=3, target_rms=2.5)
    cc.set_input_normalization(x.double().mean(0), x.double().var(0, unbiased=False))
    xn = cc.normalize(x)
    rms = xn.double().pow(2).sum(-1).mean(0).sqrt()  # per model: sqrt(mean ||x_n||^2)
    torch.testing.assert_close(rms, torch.full((2,), 2.5, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(xn.double().mean(0), torch.zeros(2, D, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(cc.denormalize(xn), x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
def test_encode_decode_forward_undo_the_normalisation(activation):
    x = skewed_data(64)
    k = 3 if activation == "batch_topk" else None
    torch.manual_seed(1)
    cc = cx.CrossCoder(D, F, 2, k=k, activation=activation, target_rms=1.0)
    cc.set_input_normalization(x.double().mean(0) + 1, x.double().var(0) * 2)  # any statistics will do
    xn = cc.normalize(x)
    out, out_n = cc(x), cc(xn, normalized=True)
    assert torch.equal(out.codes.indices, out_n.codes.indices)
    torch.testing.assert_close(out.codes.values, out_n.codes.values)
    torch.testing.assert_close(out.recon, cc.denormalize(out_n.recon))
    codes = cc.encode(x, use_threshold=False) if activation == "batch_topk" else cc.encode(x)
    torch.testing.assert_close(cc.decode(codes), cc.denormalize(cc.decode(codes, normalized=True)))
    # Gradients reach the weights through both maps (the statistics are buffers: constant).
    out.recon.square().sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in (cc.W_enc, cc.W_dec, cc.b_dec))


def test_normaliser_is_saved_with_the_model(tmp_path):
    x = skewed_data(64)
    cc = normalized_cc()
    cc.set_input_normalization(x.double().mean(0), x.double().var(0))
    cc.save_pretrained(tmp_path / "cc")
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert config["target_rms"] == 1.0 and config["format_version"] == 3
    back = cx.CrossCoder.from_pretrained(tmp_path / "cc")
    for name in ("input_mean", "input_std", "input_scale"):
        assert torch.equal(getattr(back, name), getattr(cc, name)), name
    # from_pretrained returns eval mode; cc is fresh (training mode, no threshold yet): compare in the same mode
    torch.testing.assert_close(back.train()(x).recon, cc(x).recon)
    # Version-1 files (before normalisation existed) still load, without a normaliser.
    plain = cx.CrossCoder(D, F, 2, k=3)
    plain.save_pretrained(tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    del config["target_rms"]
    config["format_version"] = 1
    (tmp_path / "v1" / "config.json").write_text(json.dumps(config))
    assert cx.CrossCoder.from_pretrained(tmp_path / "v1").target_rms is None


def test_dictionary_learning_normaliser_round_trip():
    x = skewed_data(64)
    cc = normalized_cc()
    cc.set_input_normalization(x.double().mean(0), x.double().var(0))
    sd = cx.to_dictionary_learning(cc)
    assert {"target_rms", "activation_mean", "activation_std", "activation_global_scale"} <= set(sd)
    back = cx.load_dictionary_learning(sd).train()  # loaded in eval mode; cc (no threshold yet) runs in training mode
    assert back.target_rms == 1.0
    torch.testing.assert_close(back(x).recon, cc(x).recon)
    # The library's constructor derives the global scale from std; a state without it gets the same scale.
    del sd["activation_global_scale"]
    torch.testing.assert_close(cx.load_dictionary_learning(sd).input_scale, cc.input_scale)
    # The library's normaliser applied by hand, then the plain crosscoder, then its denormaliser.
    plain = cx.load_dictionary_learning(
        {k: v for k, v in sd.items() if k not in ("activation_mean", "activation_std", "target_rms")}
    ).train()
    scale = cc.input_scale[:, None]
    xn = (x - sd["activation_mean"]) * scale
    torch.testing.assert_close(cc(x).recon, plain(xn).recon / scale + sd["activation_mean"], rtol=1e-5, atol=1e-3)


def test_dictionary_learning_normaliser_errors(tmp_path):
    sd = cx.to_dictionary_learning(normalized_cc())
    bad = dict(sd, activation_mean=torch.zeros(3, D))
    with pytest.raises(InputError, match=r"activation_mean has shape \(3, 8\), expected \(2, 8\)"):
        cx.load_dictionary_learning(bad)
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(dict(keep_relative_variance=False)))
    with pytest.raises(InputError, match="keep_relative_variance=False"):
        cx.load_dictionary_learning(tmp_path)


def test_normalisation_errors():
    with pytest.raises(ValueError, match="target_rms must be a finite number > 0"):
        cx.CrossCoder(D, F, 2, k=3, target_rms=0.0)
    with pytest.raises(ValueError, match="needs a crosscoder built with target_rms"):
        cx.CrossCoder(D, F, 2, k=3).set_input_normalization(torch.zeros(2, D), torch.ones(2, D))
    cc = normalized_cc()
    with pytest.raises(ValueError, match=r"variance must be a tensor \[M, d\] = \[2, 8\]"):
        cc.set_input_normalization(torch.zeros(2, D), torch.ones(D))
    with pytest.raises(ValueError, match="mean holds non-finite"):
        cc.set_input_normalization(torch.full((2, D), float("nan")), torch.ones(2, D))
    with pytest.raises(ValueError, match="variance must be >= 0"):
        cc.set_input_normalization(torch.zeros(2, D), -torch.ones(2, D))


def train_config(**kwargs):
    base = dict(
        steps=30, batch_size=32, lr=3e-3, warmup_steps=3, progress=False, log_every=30, seed=5, dead_tokens=10**9
    )
    return cx.TrainConfig(**(base | kwargs))


def test_train_fits_the_normaliser_from_the_data():
    x = skewed_data()
    cc = normalized_cc()
    result = cx.train(cc, x, train_config())
    mean, var = x.double().mean(0), x.double().var(0, unbiased=False)
    torch.testing.assert_close(cc.input_mean, mean.float())
    torch.testing.assert_close(cc.input_scale, (1.0 / (var.sum(1) + 1e-8).sqrt()).float())
    assert result.steps == 30


def test_normalised_training_balances_the_models():
    # Planted concepts; model 1's activations 100x larger. The loss is measured in the normalised space, where
    # both models weigh the same, so the small model is reconstructed about as well as the large one; without
    # normalisation the loss barely sees it. (Measured: FVE [0.83, 0.87] normalised, [0.33, 0.93] not.)
    p = cx.planted_dictionary(
        n_tokens=3000, d_model=D, n_shared=8, n_chat_only=4, n_base_only=4, n_weak_in_base=0, seed=1
    )
    x = p.x.clone()
    x[:, 1] = x[:, 1] * 100 + 30
    fve = {}
    for rms in (1.0, None):
        torch.manual_seed(0)
        cc = cx.CrossCoder(D, F, 2, k=3, target_rms=rms, threshold_start_step=2)
        cfg = train_config(steps=150, batch_size=64, lr=1e-2, warmup_steps=10, log_every=150)
        fve[rms] = cx.train(cc, x, cfg).last["fve_per_model"]
    assert min(fve[1.0]) > 0.7, fve
    assert fve[None][0] < 0.5 < fve[None][1], fve
    # fit_normalization=False keeps statistics set by hand.
    cc2 = normalized_cc()
    cc2.set_input_normalization(torch.zeros(2, D), torch.full((2, D), 4.0))
    cx.train(cc2, x, train_config(steps=2, fit_normalization=False))
    torch.testing.assert_close(cc2.input_scale, torch.full((2,), (1 / (32 + 1e-8)) ** 0.5))


def test_train_takes_store_and_mixture_statistics(tmp_path):
    a, b = skewed_data(300, seed=42), skewed_data(200, seed=43) * 3
    for name, data in (("a", a), ("b", b)):
        with StoreWriter(tmp_path / name, 2, D, dtype="float32", shard_rows=128) as w:
            w.append(data)
    store_a, store_b = cx.ActivationStore(tmp_path / "a"), cx.ActivationStore(tmp_path / "b")
    cc = normalized_cc()
    cx.train(cc, store_a, train_config(steps=1))
    torch.testing.assert_close(cc.input_mean, a.double().mean(0).float(), rtol=1e-5, atol=1e-4)
    # A half/half mixture: the statistics of the mixture distribution, not of either store.
    mixed = cx.MixedBatches([(store_a, 0.5), (store_b, 0.5)], 32)
    cc = normalized_cc()
    cx.train(cc, mixed, train_config(steps=1))
    both = torch.cat([a[:200], b])  # equal shares of the two distributions
    ma, mb = a.double().mean(0), b.double().mean(0)
    va, vb = a.double().var(0, unbiased=False), b.double().var(0, unbiased=False)
    mean = (ma + mb) / 2
    var = (va + ma**2 + vb + mb**2) / 2 - mean**2
    torch.testing.assert_close(cc.input_mean, mean.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cc.input_std, var.sqrt().float(), rtol=1e-5, atol=1e-4)
    assert both.shape[0] == 400
    # An iterable: its first batch.
    batches = [x for x in a.split(32)[:3]]
    cc = normalized_cc()
    cx.train(cc, batches, train_config(steps=1))
    torch.testing.assert_close(cc.input_mean, batches[0].mean(0))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights_and_resumes(tmp_path, precision):
    x = skewed_data()
    cfg = dict(steps=8, mixed_precision=precision, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4)
    straight = normalized_cc()
    cx.train(straight, x, train_config(**cfg))
    assert straight.W_enc.dtype == torch.float32 and straight.compute_dtype is None  # restored after training
    assert all(bool(torch.isfinite(p).all()) for p in straight.parameters())
    first = normalized_cc()
    cx.train(first, x, train_config(**(cfg | dict(checkpoint_dir=str(tmp_path / "b")))), until=4)
    resumed = normalized_cc(seed=9)
    cx.train(resumed, x, train_config(**(cfg | dict(checkpoint_dir=str(tmp_path / "b")))), resume=True)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    # Mixed precision really computes in the narrow dtype: the narrow-dtype step differs from the fp32 one.
    fp32 = normalized_cc()
    cx.train(fp32, x, train_config(steps=8))
    assert not torch.equal(fp32.W_enc, straight.W_enc)


def test_mixed_precision_trains_as_well_as_fp32():
    p = cx.planted_dictionary(
        n_tokens=3000, d_model=D, n_shared=8, n_chat_only=4, n_base_only=4, n_weak_in_base=0, seed=2
    )
    fve = {}
    for precision in (None, "bf16", "fp16"):
        cc = normalized_cc()
        cfg = train_config(steps=150, batch_size=64, lr=1e-2, warmup_steps=10, log_every=150, mixed_precision=precision)
        fve[precision] = cx.train(cc, p.x, cfg).last["fve"]
    assert fve[None] > 0.7, fve
    assert abs(fve["bf16"] - fve[None]) < 0.05 and abs(fve["fp16"] - fve[None]) < 0.05, fve


def test_mixed_precision_errors():
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        cx.train(normalized_cc(), skewed_data(), train_config(mixed_precision="fp8"))
    with pytest.raises(ValueError, match="crosscoder must be float32, got torch.bfloat16"):
        cx.train(normalized_cc(dtype=torch.bfloat16), skewed_data(), train_config(mixed_precision="bf16"))
