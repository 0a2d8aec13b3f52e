"""Latent Scaling against the per-latent closed form (the paper code's dense computation), on every backend; and
on a hand-built crosscoder whose latents have known nu values: a genuine chat-only latent, a weak-in-base one,
a Complete Shrinkage artifact and a Latent Decoupling pair (docs/math.md, "Reading a crosscoder")."""

import math

import pytest
import torch
from conftest import backend_device, backend_params, rng

import crossdiff_ext as cx
from crossdiff_ext.diffing.latent_scaling import latent_scaling_reference
from crossdiff_ext.errors import InputError


def random_cc(activation, M=2, d=12, F=37, seed=0, dtype=torch.float32, device="cpu"):
    g = rng(seed)
    k = 3 if activation == "batch_topk" else None
    cc = cx.CrossCoder(d, F, M, k=k, activation=activation, dtype=dtype, device=device)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(F, M, d, generator=g) / d**0.5)
        cc.W_dec.copy_(torch.randn(F, M, d, generator=g) / d**0.5)
        cc.b_enc.copy_(torch.randn(F, generator=g) * 0.1 - 0.1)
        cc.b_enc[::7] = -100.0  # latents that never fire
        cc.b_dec.copy_(torch.randn(M, d, generator=g))
        if activation == "batch_topk":
            cc.threshold.fill_(0.3)
    return cc


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("activation", ["batch_topk", "relu"])
@pytest.mark.parametrize("probe", ["chat", "base"])
def test_matches_the_dense_closed_form(backend, activation, probe):
    device = backend_device(backend)
    cc = random_cc(activation, device=device)
    x = torch.randn(203, 2, 12, generator=rng(71)).to(device)  # 203 rows in batches of 64: a partial last batch
    with cx.backend(backend):
        result = cx.latent_scaling(cc, x, probe=probe, batch_size=64)
    expected = latent_scaling_reference(cc, x, probe=1 if probe == "chat" else 0)
    for key, beta in expected.items():
        torch.testing.assert_close(result.beta[key], beta, rtol=1e-4, atol=1e-5, equal_nan=True, msg=str(key))
    # nu is the ratio of the betas checked above (compared as a ratio it would amplify their rounding wherever
    # the chat beta is near 0).
    for nu, target in ((result.nu_error, "error"), (result.nu_reconstruction, "reconstruction")):
        torch.testing.assert_close(
            nu, result.beta[(target, 0)] / result.beta[(target, 1)], rtol=0, atol=0, equal_nan=True
        )
    fired = ~torch.isnan(expected[("error", 1)])
    assert 0 < int(fired.sum()) < cc.dict_size  # some latents fire, some never do (they get NaN)
    assert torch.equal(result.activation_count > 0, fired)
    assert result.tokens == 203


def test_streaming_inputs_agree_and_subsets(tmp_path):
    from crossdiff_ext.data.store import StoreWriter

    cc = random_cc("batch_topk", M=3, seed=4)
    x = torch.randn(150, 3, 12, generator=rng(72))
    whole = cx.latent_scaling(cc, x, batch_size=1000, base=2, chat=0)
    with StoreWriter(tmp_path / "s", 3, 12, dtype="float32", shard_rows=40) as w:
        w.append(x)
    store = cx.latent_scaling(cc, cx.ActivationStore(tmp_path / "s"), batch_size=33, base=2, chat=0)
    batches = cx.latent_scaling(cc, list(x.split(50)), base=2, chat=0)
    for other in (store, batches):
        for key in whole.beta:
            torch.testing.assert_close(other.beta[key], whole.beta[key], rtol=1e-6, atol=1e-9, equal_nan=True)
    assert set(whole.beta) == {(t, m) for t in ("reconstruction", "error") for m in range(3)}
    torch.testing.assert_close(whole.nu_error, whole.beta[("error", 2)] / whole.beta[("error", 0)], equal_nan=True)
    subset = cx.latent_scaling(cc, x, latents=[5, 0, 36], targets="error", base=2, chat=0)
    assert subset.latents.tolist() == [5, 0, 36]
    torch.testing.assert_close(subset.beta[("error", 1)], whole.beta[("error", 1)][[5, 0, 36]], equal_nan=True)
    assert bool(subset.nu_reconstruction.isnan().all())  # not computed
    assert cc.training  # the mode is restored


def test_normalised_crosscoder_scales_in_its_own_space():
    cc = random_cc("relu", seed=5)
    x = torch.randn(100, 2, 12, generator=rng(73))
    normed = cx.CrossCoder(12, 37, 2, activation="relu", target_rms=1.0)
    normed.load_state_dict(cc.state_dict(), strict=False)
    normed.set_input_normalization(torch.full((2, 12), 3.0), torch.full((2, 12), 25.0))
    result = cx.latent_scaling(normed, normed.denormalize(x))  # raw inputs that normalise back to x
    expected = cx.latent_scaling(cc, x)
    for key in expected.beta:
        torch.testing.assert_close(result.beta[key], expected.beta[key], rtol=1e-4, atol=1e-5, equal_nan=True)


def test_errors_are_named():
    cc = random_cc("batch_topk")
    x = torch.randn(10, 2, 12)
    with pytest.raises(InputError, match="targets must be distinct names"):
        cx.latent_scaling(cc, x, targets=("recon",))
    with pytest.raises(InputError, match="probe"):
        cx.latent_scaling(cc, x, probe="instruct")
    with pytest.raises(InputError, match=r"latents must be ids in \[0, 37\)"):
        cx.latent_scaling(cc, x, latents=[37])
    with pytest.raises(InputError, match=r"batches must be \[B, M, d\] = \[B, 2, 12\]"):
        cx.latent_scaling(cc, torch.randn(10, 2, 11))
    with pytest.raises(InputError, match="base and chat must be different"):
        cx.latent_scaling(cc, x, base=1, chat=1)
    cc.threshold.fill_(-1)
    with pytest.raises(InputError, match="threshold is unset"):
        cx.latent_scaling(cc, x)


# ------------------------------------------------------------------- the paper's artifacts, built by hand

from handmade_crosscoders import artifact_crosscoder  # noqa: E402


def test_latent_scaling_exposes_shrinkage_and_decoupling():
    cc, x = artifact_crosscoder()
    result = cx.latent_scaling(cc, x, batch_size=512)
    nu_e, nu_r = result.nu_error, result.nu_reconstruction
    expected_error = [1.0, 0.0, 0.3, 1.0, 0.0, math.nan]  # latent 5 has a zero chat row: its probe is 0
    expected_recon = [1.0, 0.0, 0.3, 0.0, 1.0, math.nan]
    torch.testing.assert_close(
        nu_e, torch.tensor(expected_error, dtype=torch.float64), atol=1e-4, rtol=0, equal_nan=True
    )
    torch.testing.assert_close(
        nu_r, torch.tensor(expected_recon, dtype=torch.float64), atol=1e-4, rtol=0, equal_nan=True
    )
    classes = cx.classify_latents(cc, result)
    assert classes == ["shared", "chat_specific", "other", "complete_shrinkage", "latent_decoupling", "base_only"]
    assert cx.classify_latents(cc) == ["shared", "chat_only", "other", "chat_only", "chat_only", "base_only"]
    with pytest.raises(ValueError, match="every latent"):
        cx.classify_latents(cc, cx.latent_scaling(cc, x, latents=[1, 3]))


def test_latent_table(tmp_path):
    import csv

    cc, x = artifact_crosscoder()
    result = cx.latent_scaling(cc, x)
    table = cx.latent_table(cc, result)
    assert len(table["latent"]) == 6 and all(len(v) == 6 for v in table.values())
    assert table["class"][3] == "complete_shrinkage"
    cc.eval()
    fired = (cc.encode(x).to_dense() != 0).double().mean(0)
    assert table["firing_frequency"] == pytest.approx(fired.tolist(), abs=1e-12)
    path = cx.write_table(table, tmp_path / "latents.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["class"] for r in rows] == table["class"]
    assert float(rows[2]["nu_error"]) == pytest.approx(0.3, abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.csv"]  # no temp file left
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Parquet needs pyarrow"):
            cx.write_table(table, tmp_path / "latents.parquet")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["latents.csv"]
