"""Dedicated latents (CrossCoder(partition=...)): the forward pass and every gradient equal plain PyTorch math on
every kernel backend; a dedicated latent's absent rows are exactly zero and stay so through training (Adam, the
aux loss, the L1 penalty, mixed precision), AdamW's weight decay and clipping, save / load, sharded checkpoints
and resume; Latent Scaling, the latent table and the report read them; bad partitions are named."""

import json
import math
import os

import pytest
import torch
from conftest import backend_device, backend_params, close, dtypes_for, grid_tensor, rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.diffing import report
from crossdiff_ext.diffing.latent_scaling import latent_scaling_reference
from crossdiff_ext.distributed.layer import shard_config
from crossdiff_ext.errors import InputError
from crossdiff_ext.layer import checkpoints, sharded
from crossdiff_ext.layer.partition import absent_rows, shard_partition
from crossdiff_ext.training import losses


def absent_values(cc, name):
    """The entries of `name` ([F, M, d]) that the partition fixes at zero."""
    W = getattr(cc, name)
    return W[absent_rows(cc.partition, cc.dict_size, cc.n_models).to(W.device)]


def assert_absent_rows_zero(cc, *names):
    for name in names or ("W_enc", "W_dec"):
        values = absent_values(cc, name)
        assert values.numel() > 0 and bool((values == 0).all()), f"{name}: an absent row is not zero"


def filled(cc, g, low=-8, high=8):
    """cc with random grid weights (exact in fp32), the partition's zeros put back."""
    F, M, d = cc.W_enc.shape
    dtype, device = cc.W_enc.dtype, cc.W_enc.device
    mask = absent_rows(cc.partition, F, M).to(device)[:, :, None]
    with torch.no_grad():
        for name in ("W_enc", "W_dec"):
            getattr(cc, name).copy_(grid_tensor((F, M, d), low, high, 16, dtype, device, g).masked_fill(mask, 0))
        cc.b_enc.copy_(grid_tensor((F,), -4, 8, 8, dtype, device, g))
        cc.b_dec.copy_(grid_tensor((M, d), -8, 8, 8, dtype, device, g))
    return cc


def dense_step(cc, x, codes):
    """Plain PyTorch math of one training step, with every [latent, model] row free (no partition): the encoder
    f = relu(sum_m x_m W_enc[:, m]^T + b_enc), kept where the step's codes are (their selection is checked
    separately), recon = f_kept W_dec + b_dec, the unsquared L2 loss (+ the L1 penalty for relu). Returns the loss
    and the gradients of every parameter."""
    params = {n: p.detach().float().clone().requires_grad_(True) for n, p in cc.named_parameters()}
    x = x.float()
    f = torch.relu(torch.einsum("bmd,fmd->bf", x, params["W_enc"]) + params["b_enc"])
    kept = f * (codes.to_dense() != 0)
    recon = torch.einsum("bf,fmd->bmd", kept, params["W_dec"]) + params["b_dec"]
    loss = (x - recon).norm(dim=-1).mean()
    if cc.activation == "relu":
        loss = loss + 0.05 * (kept * params["W_dec"].norm(dim=2).sum(1)).sum() / x.shape[0]
    loss.backward()
    return loss, recon, {n: p.grad for n, p in params.items()}


def module_step(cc, x, name):
    cc.zero_grad(set_to_none=True)
    with cx.backend(name):
        out = cc(x)
    loss = (x.float() - out.recon.float()).norm(dim=-1).mean()
    if cc.activation == "relu":
        loss = loss + 0.05 * losses.l1_penalty(out.codes, losses.decoder_norms(cc))
    loss.backward()
    return out, loss, {n: p.grad for n, p in cc.named_parameters()}


CASES = [  # (B, M, d, F, k, activation, partition, dense_code_density)
    (9, 2, 7, 40, 3, "batch_topk", (6, 9), 1.0),
    (10, 3, 5, 33, 12, "batch_topk", (4, 0, 7), 1.0),
    (8, 2, 6, 30, None, "relu", (5, 4), 1.0),  # sparse decoder
    (8, 2, 6, 30, None, "relu", (5, 4), 0.0),  # dense regime
]


@pytest.mark.parametrize("name", backend_params())
@pytest.mark.parametrize("B,M,d,F,k,activation,partition,density", CASES)
def test_forward_and_gradients_equal_plain_math(name, B, M, d, F, k, activation, partition, density):
    device = backend_device(name)
    # Triton's interpreter is slow: fp32 there (test_crosscoder.py covers its half precision without partitions).
    for dtype in dtypes_for(name) if device != "cpu" or name == "cpu" else [torch.float32]:
        g = rng(F * 31 + M)
        cc = cx.CrossCoder(d, F, M, k=k, activation=activation, partition=partition, dtype=dtype, device=device)
        cc.dense_code_density = density
        filled(cc, g)
        with torch.no_grad():  # dedicated latents (one decoder row, a smaller selection weight) are selected too
            cc.b_enc[: sum(partition)] += 4
        x = grid_tensor((B, M, d), -4, 4, 2, dtype, device, g)
        out, loss, grads = module_step(cc, x, name)
        ref, ref_loss, ref_grads = module_step(cc, x, "reference")
        for part in ("indices", "row_ptr", "values"):  # the same selection as the reference backend, exactly
            torch.testing.assert_close(getattr(out.codes, part), getattr(ref.codes, part), rtol=0, atol=0)
        # The selection weighs each latent by its decoder norms, the zero rows included.
        w = torch.linalg.vector_norm(cc.W_dec.detach().float(), dim=2).sum(1)
        torch.testing.assert_close(cc.decoder_norm_weights(), w)
        plain_loss, plain_recon, plain = dense_step(cc, x, out.codes)
        close(out.recon, plain_recon.to(dtype), dtype, scale=8.0)
        close(loss, plain_loss, dtype)
        mask = absent_rows(cc.partition, F, M).to(device)
        for n, expected in plain.items():
            assert grads[n] is not None and grads[n].dtype == dtype, n
            close(grads[n], ref_grads[n], dtype, scale=8.0)
            if n in ("W_enc", "W_dec"):
                # Unconstrained, the absent rows would learn: the partition is what zeroes their gradient.
                assert bool(expected[mask].abs().sum() > 0), f"{n}: weak case, the absent rows get no gradient anyway"
                assert bool((grads[n][mask] == 0).all()), f"{n}: an absent row got a gradient"
                expected = expected.masked_fill(mask[:, :, None], 0)
            close(grads[n], expected.to(dtype), dtype, scale=8.0)


def tiny(seed=0, partition=(5, 7), activation="batch_topk", **kwargs):
    torch.manual_seed(seed)
    k = 2 if activation == "batch_topk" else None
    return cx.CrossCoder(8, 32, 2, k=k, activation=activation, threshold_start_step=2, partition=partition, **kwargs)


def train_config(tmp=None, **kwargs):
    base = dict(
        steps=8,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        dead_tokens=32,
        checkpoint_every=4,
        checkpoint_dir=None if tmp is None else str(tmp),
        log_every=2,
        progress=False,
        seed=3,
    )
    base.update(kwargs)
    return cx.TrainConfig(**base)


@pytest.mark.parametrize(
    "activation,mixed_precision", [("batch_topk", None), ("batch_topk", "bf16"), ("relu", None)], ids=str
)
def test_absent_rows_stay_zero_through_training_and_save_load(tmp_path, activation, mixed_precision):
    data = torch.randn(240, 2, 8, generator=rng(41)) * torch.tensor([1.0, 2.0])[None, :, None]
    cc = tiny(activation=activation, target_rms=1.0)
    assert_absent_rows_zero(cc)
    start = {n: p.detach().clone() for n, p in cc.named_parameters()}
    result = cx.train(cc, data, train_config(tmp_path / "run", mixed_precision=mixed_precision))
    assert_absent_rows_zero(cc)
    for name in ("W_enc", "W_dec"):  # every dedicated latent's own rows and the shared rows trained
        present = ~absent_rows(cc.partition, 32, 2)
        assert bool((getattr(cc, name)[present] != start[name][present]).any(dim=-1).all()), name
    if activation == "batch_topk":
        assert result.last["aux"] > 0  # dead latents, dedicated ones among them, were trained by the aux loss
    else:
        assert result.last["l1"] > 0
    assert result.last["delta_norm_bands"]["base_only"] >= 5 and result.last["delta_norm_bands"]["chat_only"] >= 7
    loaded = cx.CrossCoder.from_pretrained(result.checkpoint)
    assert loaded.partition == (5, 7) and json.load(open(os.path.join(result.checkpoint, "config.json")))[
        "partition"
    ] == [5, 7]
    for name, t in cc.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert_absent_rows_zero(loaded)


def test_adamw_weight_decay_clipping_and_the_aux_loss_keep_the_zeros():
    """A hand-written loop: every loss the library has, AdamW with weight decay, gradient clipping."""
    cc = tiny(seed=1)
    opt = torch.optim.AdamW(cc.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(5):
        x = torch.randn(16, 2, 8, generator=rng(50 + step))
        out = cc(x)
        dead = torch.ones(cc.dict_size, dtype=torch.bool)  # every latent in the aux loss
        loss = losses.reconstruction_loss(x, out.recon)
        loss = loss + losses.aux_loss(cc, x, out.recon, dead) + losses.l1_penalty(out.codes, losses.decoder_norms(cc))
        opt.zero_grad()
        loss.backward()
        for name in ("W_enc", "W_dec"):
            grad = getattr(cc, name).grad
            assert bool((grad[absent_rows(cc.partition, 32, 2)] == 0).all()), name
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 0.1)
        opt.step()
    assert_absent_rows_zero(cc)


def test_resume_continues_exactly(tmp_path):
    data = torch.randn(200, 2, 8, generator=rng(42))
    straight = tiny()
    cx.train(straight, data, train_config(tmp_path / "a"))
    first = tiny()
    cx.train(first, data, train_config(tmp_path / "b"), until=4)
    resumed = tiny(seed=9)
    assert cx.train(resumed, data, train_config(tmp_path / "b"), resume=True).steps == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert_absent_rows_zero(resumed)
    for other in ((7, 5), None):  # the checkpoint's partition is part of what resumes
        with pytest.raises(InputError, match=r"saved with partition \[5, 7\]"):
            cx.train(tiny(partition=other), data, train_config(tmp_path / "b", steps=12), resume=True)
    plain = tmp_path / "plain"
    cx.train(tiny(partition=None), data, train_config(plain, steps=2))
    with pytest.raises(InputError, match=r"saved with partition None, .* has partition \[5, 7\]"):
        cx.train(tiny(), data, train_config(plain, steps=4), resume=True)


def test_sharded_checkpoints_split_and_merge_the_partition(tmp_path):
    cc = tiny(partition=(5, 7))
    ranges = [(0, 4), (4, 11), (11, 20), (20, 32)]  # all-base, base + chat, chat + shared, shared
    directory = tmp_path / "step"
    os.makedirs(directory)
    shards = []
    for r, (first, end) in enumerate(ranges):
        config = shard_config(cc.config(), first, end)
        config["dtype"] = checkpoints.torch_dtype(config["dtype"], "config")
        shard = checkpoints.build(cx.CrossCoder, config, sharded.slice_state(cc.state_dict(), first, end), "cpu")
        assert shard.partition == shard_partition(cc.partition, first, end)
        shard.save_pretrained(directory / sharded.shard_dir_name(r, len(ranges)))
        shards.append(dict(dir=sharded.shard_dir_name(r, len(ranges)), first=first, end=end))
    assert [s.partition for s in map(cx.CrossCoder.from_pretrained, sorted(directory.iterdir()))] == [
        (4, 0),
        (1, 6),
        (0, 1),
        None,
    ]
    (directory / sharded.SHARDING_NAME).write_text(json.dumps(dict(dict_size=32, shards=shards)))
    merged = cx.CrossCoder.from_pretrained(directory)
    assert merged.partition == (5, 7) and checkpoints.stored_partition(directory) == (5, 7)
    for name, t in cc.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name
    # Shards whose parts do not line up into one partition are refused, naming the shard: the last shard's
    # first latent made chat-dedicated (its base rows zero) would sit after shared latents.
    last = cx.CrossCoder.from_pretrained(directory / shards[3]["dir"])
    config = dict(last.config(), partition=[0, 1], dtype=torch.float32)
    state = {n: t.clone() for n, t in last.state_dict().items()}
    state["W_enc"][0, 0] = state["W_dec"][0, 0] = 0
    checkpoints.build(cx.CrossCoder, config, state, "cpu").save_pretrained(directory / shards[3]["dir"])
    with pytest.raises(InputError, match=r"shard-00\d-of-004: partition .* does not fit .* partition \(5, 8\)"):
        cx.CrossCoder.from_pretrained(directory)


def test_old_checkpoints_load_and_broken_rows_are_refused(tmp_path):
    cc = tiny()
    cc.save_pretrained(tmp_path / "cc")
    config_path = tmp_path / "cc" / "config.json"
    config = json.loads(config_path.read_text())
    old = {k: v for k, v in config.items() if k != "partition"}
    config_path.write_text(json.dumps(dict(old, format_version=2)))  # written before partitions existed
    assert cx.CrossCoder.from_pretrained(tmp_path / "cc").partition is None
    config_path.write_text(json.dumps(config))
    state = dict(cc.state_dict())
    state["W_dec"] = state["W_dec"].clone()
    state["W_dec"][6, 0, 3] = 0.25  # latent 6 is chat-dedicated: its base row must be zero
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "cc" / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors: W_dec has non-zero rows for 1 dedicated .*\[6\]"):
        cx.CrossCoder.from_pretrained(tmp_path / "cc")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(partition=(-1, 3)), r"partition must hold ints >= 0"),
        (dict(partition=(20, 13)), r"partition dedicates 33 latents \(20 \+ 13\), more than dict_size = 32"),
        (dict(partition=(3,)), r"partition must hold one latent count per model \(n_models = 2\)"),
        (dict(partition=(1, 2, 3)), r"partition must hold one latent count per model \(n_models = 2\)"),
        (dict(partition=(1.5, 2)), r"partition must hold ints >= 0"),
        (dict(partition="12"), r"partition must be a sequence of 2 latent counts"),
    ],
)
def test_bad_partition_is_named(kwargs, match):
    with pytest.raises(InputError, match=match):
        cx.CrossCoder(8, 32, 2, k=2, **kwargs)


def test_all_zero_partition_is_no_partition():
    assert cx.CrossCoder(8, 32, 2, k=2, partition=(0, 0)).partition is None


def test_latent_scaling_table_and_report_read_dedicated_latents():
    g = rng(61)
    cc = cx.CrossCoder(12, 30, 2, k=3, partition=(4, 6))
    filled(cc, g)
    with torch.no_grad():
        cc.W_enc.mul_(0.1)
        cc.W_dec.mul_(0.1)
        cc.b_enc[:10] += 1.0  # every dedicated latent fires somewhere
    cc.threshold.fill_(0.05)
    x = torch.randn(300, 2, 12, generator=g)
    scaling = cx.latent_scaling(cc, x, batch_size=128)
    expected = latent_scaling_reference(cc, x, probe=1)
    for key, beta in expected.items():
        torch.testing.assert_close(scaling.beta[key], beta, rtol=1e-4, atol=1e-5, equal_nan=True, msg=str(key))
    base_ded, chat_ded = slice(0, 4), slice(4, 10)
    assert bool((scaling.activation_count[base_ded] > 0).all()) and bool((scaling.activation_count[chat_ded] > 0).all())
    # A base-dedicated latent has no chat row to probe: NaN, not a division by a zero norm.
    assert all(math.isnan(v) for v in scaling.nu_error[base_ded].tolist())
    assert all(math.isfinite(v) for v in scaling.beta[("error", 0)][chat_ded].tolist())
    base_probe = cx.latent_scaling(cc, x, probe="base", batch_size=128)  # scores them with their own rows
    assert all(math.isfinite(v) for v in base_probe.beta[("error", 1)][base_ded].tolist())

    table = cx.latent_table(cc, scaling)
    assert table["partition"] == ["base_dedicated"] * 4 + ["chat_dedicated"] * 6 + ["shared"] * 20
    assert table["delta_norm"][:4] == [0.0] * 4 and table["delta_norm"][4:10] == [1.0] * 6
    assert set(table["class"][:4]) == {"base_only"}
    assert set(table["class"][4:10]) <= {
        "chat_specific",
        "complete_shrinkage",
        "latent_decoupling",
        "shrinkage_and_decoupling",
    }
    page = report.render(table, top=5)
    assert "<h2>Dedicated latents</h2>" in page and "<td>chat_dedicated</td><td>6</td>" in page
    assert "<th>partition</th>" in page
    plain = cx.latent_table(cx.CrossCoder(12, 30, 2, k=3))
    assert set(plain["partition"]) == {"shared"}
    assert "Dedicated latents" not in report.render(plain)


def test_train_command_takes_a_partition(tmp_path, capsys):
    from crossdiff_ext.data.store import StoreWriter

    with StoreWriter(tmp_path / "store", 2, 4, dtype="float32", shard_rows=32) as w:
        w.append(torch.randn(64, 2, 4, generator=rng(62)))
    argv = ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--dict-size", "8", "-k"]
    argv += ["2", "--steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--quiet", "--partition", "2", "3"]
    assert cli.main(argv) == 0
    cc = cx.CrossCoder.from_pretrained(tmp_path / "run" / "step-00000002")
    assert cc.partition == (2, 3)
    assert_absent_rows_zero(cc)
    capsys.readouterr()
    for bad, message in ((["9", "0"], "--partition dedicates 9 latents"), (["2"], "--partition must hold one")):
        argv[argv.index("--out") + 1] = str(tmp_path / "other")
        assert cli.main(argv[: argv.index("--partition") + 1] + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("crossdiff train: error: ") and message in err[0], err
