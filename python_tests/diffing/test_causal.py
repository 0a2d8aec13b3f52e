"""Causal patching, attribution and steering on tiny random transformers models: the block helpers on four
architectures, exact identities of the patching experiment against direct hook-based computations, attribution
against finite differences, the scored positions of conversations, the paper's latent sets, and clear errors
before any model runs."""

import json
import math

import pytest
import torch
import transformers
from tiny_models import WORDS, make_model, make_tokenizer

import crossdiff_ext as cx
from crossdiff_ext.diffing import causal, scored_positions
from crossdiff_ext.errors import InputError, MissingInputError
from crossdiff_ext.models import blocks as decoder_blocks

LAYER = 1


def tiny(kind, seed=0, vocab=40):
    """A random 3-block decoder of the given architecture, width 16."""
    torch.manual_seed(seed)
    t = transformers
    common = dict(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**common)).eval()
    if kind == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8)).eval()
    config = t.GPT2Config(
        vocab_size=vocab, n_embd=16, n_layer=3, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return t.GPT2LMHeadModel(config).eval()


def known_block(model, layer):
    """The block by its architecture's own attribute path (independent of decoder_blocks' search)."""
    return model.transformer.h[layer] if hasattr(model, "transformer") else model.model.layers[layer]


def replace_output(model, layer, new):
    def hook(module, args, output):
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return known_block(model, layer).register_forward_hook(hook)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2", "qwen2"])
def test_blocks_of_every_architecture(kind):
    model = tiny(kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    assert decoder_blocks.decoder_blocks(model)[LAYER] is known_block(model, LAYER)

    fired = []
    later = [known_block(model, LAYER + 1), model.get_output_embeddings()]
    handles = [m.register_forward_hook(lambda *a, i=i: fired.append(i)) for i, m in enumerate(later)]
    try:
        h = decoder_blocks.run_to_layer(model, LAYER, input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
    assert fired == []  # neither the next block nor the head ran
    torch.testing.assert_close(h, full.hidden_states[LAYER + 1], rtol=0, atol=0)

    # edit_block_output against a hook on the known path: the same logits, masks and positions untouched.
    shift = torch.randn(h.shape, generator=g)
    with torch.no_grad(), decoder_blocks.edit_block_output(model, LAYER, lambda x: x + shift):
        edited = model(input_ids=ids, attention_mask=attention).logits
    handle = replace_output(model, LAYER, full.hidden_states[LAYER + 1] + shift)
    try:
        with torch.no_grad():
            direct = model(input_ids=ids, attention_mask=attention).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, direct, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, full.logits, atol=1e-3)

    # skip_through_layer: the same logits without computing blocks 0..L (nothing inside them runs).
    formats = []
    blocks = decoder_blocks.decoder_blocks(model)
    handles = [
        blocks[i].register_forward_hook(lambda m, a, o: formats.append(decoder_blocks.output_format(o)))
        for i in range(LAYER + 1)
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention, use_cache=False)
    for handle in handles:
        handle.remove()
    inside = []
    handles = [next(iter(blocks[i].children())).register_forward_hook(lambda *a: inside.append(1)) for i in range(2)]
    try:
        with torch.no_grad(), decoder_blocks.skip_through_layer(model, LAYER, h + shift, formats):
            skipped = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    assert inside == [] and "forward" not in blocks[0].__dict__  # restored on exit
    torch.testing.assert_close(skipped, direct, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- patching identities


def exact_crosscoder(d=16):
    """A ReLU crosscoder that reconstructs every input exactly: per model and coordinate, one latent for +e_i and
    one for -e_i, each in that model's rows only."""
    cc = cx.CrossCoder(d, 4 * d, 2, activation="relu")
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        for m in range(2):
            for i in range(d):
                for sign in (0, 1):
                    j = m * 2 * d + 2 * i + sign
                    cc.W_enc[j, m, i] = cc.W_dec[j, m, i] = 1.0 if sign == 0 else -1.0
    return cc.eval()


def random_crosscoder(seed, F=24, d=16):
    """A random ReLU crosscoder with an input normaliser and decoder biases set (nothing cancels)."""
    torch.manual_seed(seed)
    cc = cx.CrossCoder(d, F, 2, activation="relu", target_rms=1.0)
    cc.set_input_normalization(torch.randn(2, d) * 0.1, torch.rand(2, d) + 0.5)
    with torch.no_grad():
        cc.b_dec.normal_(0, 0.3)
        cc.b_enc.fill_(0.05)
    return cc.eval()


@pytest.fixture(scope="module")
def models(pair):  # noqa: F811
    load = transformers.AutoModelForCausalLM.from_pretrained
    tok = transformers.AutoTokenizer.from_pretrained(pair[1])
    return (load(pair[0]).eval(), tok), (load(pair[1]).eval(), tok)


DOCS = ["<bos> w1 w5 w9 w2 w7 w7 w3", "<bos> w4 w4 w10 w11", "<bos> w20 w21 w22 w23 w24 w25 w26 w27 w28"]


def per_document(models, doc):
    (base, tok), (chat, _) = models
    ids = torch.tensor([tok(doc)["input_ids"]])
    with torch.no_grad():
        h_base = base(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
        out = chat(input_ids=ids, output_hidden_states=True)
    return ids, h_base, out.hidden_states[LAYER + 1], torch.log_softmax(out.logits.double(), -1)


def direct_kl(models, replacement_of, ignore_first=1):
    """Mean KL(P_chat || P_patched) over every position from ignore_first, one document at a time, with block L's
    output of the chat model replaced by replacement_of(ids, h_base, h_chat) through a hook of its own."""
    (_, _), (chat, _) = models
    values = []
    for doc in DOCS:
        ids, h_base, h_chat, logp_chat = per_document(models, doc)
        handle = replace_output(chat, LAYER, replacement_of(ids, h_base, h_chat))
        try:
            with torch.no_grad():
                logp = torch.log_softmax(chat(input_ids=ids).logits.double(), -1)
        finally:
            handle.remove()
        values.append((logp_chat.exp() * (logp_chat - logp)).sum(-1)[0, ignore_first:])
    values = torch.cat(values).double()
    return float(values.mean()), int(values.numel())


def patched(h_base, h_chat, delta=None, ignore_first=1):
    """h_base (+ delta) from ignore_first on, the chat model's own h_chat before."""
    out = h_chat.clone()
    out[:, ignore_first:] = h_base[:, ignore_first:] + (0 if delta is None else delta[:, ignore_first:])
    return out


def test_patching_identities_with_an_exact_crosscoder(models):
    cc = exact_crosscoder()
    every = torch.arange(cc.dict_size)
    result = cx.causal.patch_kl(*models, cc, LAYER, DOCS, {"every": every}, batch_size=2, progress=False)
    none_direct, n = direct_kl(models, lambda ids, hb, hc: patched(hb, hc))
    mean, ci, count = result.kl["none"]["all"]
    assert count == n == sum(len(d.split()) - 1 for d in DOCS)
    assert mean == pytest.approx(none_direct, rel=1e-5, abs=1e-7) and mean > 1e-3 and ci > 0
    # Exact reconstruction: "all" is h_chat itself, and so is every latent replaced (the biases are zero).
    assert abs(result.kl["all"]["all"][0]) < 1e-6
    assert abs(result.kl["every"]["all"][0]) < 1e-5
    assert result.set_sizes == {"none": 0, "all": cc.dict_size, "every": cc.dict_size}


def test_every_latent_is_h_chat_shifted_by_the_raw_bias_difference(models):
    cc = random_crosscoder(3)
    s, mean = cc.input_scale, cc.input_mean
    shift = (cc.b_dec[1] / s[1] + mean[1] - cc.b_dec[0] / s[0] - mean[0]).detach()

    def every(ids, hb, hc):
        with torch.no_grad():
            recon = cc(torch.stack([hb[0], hc[0]], 1)).recon
        return patched(hb, hc, (recon[:, 1] - recon[:, 0] - shift)[None])

    def all_set(ids, hb, hc):
        with torch.no_grad():
            recon = cc(torch.stack([hb[0], hc[0]], 1)).recon
        return patched(hb, hc, (recon[:, 1] - recon[:, 0])[None])

    sets = {"every": torch.arange(cc.dict_size)}
    result = cx.causal.patch_kl(*models, cc, LAYER, DOCS, sets, batch_size=3, progress=False)
    assert result.kl["every"]["all"][0] == pytest.approx(direct_kl(models, every)[0], rel=1e-4, abs=1e-6)
    assert result.kl["all"]["all"][0] == pytest.approx(direct_kl(models, all_set)[0], rel=1e-4, abs=1e-6)


def test_add_variant_of_one_latent_against_dense_codes(models):
    cc = random_crosscoder(4)
    with torch.no_grad():
        fired = [
            cc.encode(torch.stack([hb[0], hc[0]], 1)).to_dense()[1:]
            for _, hb, hc, _ in map(lambda d: per_document(models, d), DOCS)
        ]
    j = int(torch.cat(fired).gt(0).sum(0).argmax())  # the latent that fires most

    def add_j(ids, hb, hc):
        with torch.no_grad():
            f = cc.encode(torch.stack([hb[0], hc[0]], 1)).to_dense()[:, j]
        return patched(hb, hc, (f[:, None] * cc.W_dec[j, 1].detach() / cc.input_scale[1])[None])

    result = cx.causal.patch_kl(*models, cc, LAYER, DOCS, {"one": [j]}, variant="add", batch_size=1, progress=False)
    assert result.kl["one"]["all"][0] == pytest.approx(direct_kl(models, add_j)[0], rel=1e-4, abs=1e-6)
    assert result.kl["one"]["all"][0] != pytest.approx(result.kl["none"]["all"][0], rel=1e-3)


def test_attribution_is_the_derivative_of_the_kl(models):
    (base, tok), (chat, _) = models
    base64, chat64 = (m.__class__(m.config).eval() for m in (base, chat))
    base64.load_state_dict(base.state_dict())
    chat64.load_state_dict(chat.state_dict())
    pair64 = ((base64.double(), tok), (chat64.double(), tok))
    cc = random_crosscoder(5)
    score = cx.causal.attribution(*pair64, cc, LAYER, DOCS, batch_size=2)
    assert score.shape == (cc.dict_size,) and score.dtype == torch.float64
    direction = causal.raw_decoder_difference(cc).double()
    checked = 0
    for j in torch.argsort(score.abs(), descending=True)[:4].tolist():
        eps = 1e-3

        def kl_at(e):
            def edit(ids, hb, hc):
                with torch.no_grad():
                    f = cc.encode(torch.stack([hb[0].float(), hc[0].float()], 1)).to_dense()[:, j].double()
                return patched(hb, hc, (e * f[:, None] * direction[j])[None])

            mean, n = direct_kl(pair64, edit)
            return mean * n

        derivative = (kl_at(eps) - kl_at(-eps)) / (2 * eps)
        assert score[j] == pytest.approx(derivative, rel=1e-3, abs=1e-7)
        checked += abs(derivative) > 1e-6
    assert checked >= 2  # the check saw latents that matter


# --------------------------------------------------------------------------------------------- conversations

CONVERSATION = [
    {"role": "user", "content": "w3 w4"},
    {"role": "assistant", "content": "w5 w6 w7 w8 w9"},
    {"role": "user", "content": "w1"},
    {"role": "assistant", "content": "w2 w3 w4"},
]


def test_conversations_score_the_assistant_tokens():
    tok = make_tokenizer()
    doc = scored_positions.score_document(CONVERSATION, tok, context_length=64, first_k=2, ignore_first=1)
    words = tok.convert_ids_to_tokens(doc.ids)
    predicted = [words[t + 1] for t in range(len(words) - 1) if doc.labels[t]]
    assert predicted == ["w5", "w6", "w7", "w8", "w9", "w2", "w3", "w4"]
    first = [words[t + 1] for t in range(len(words) - 1) if doc.labels[t] == scored_positions.FIRST_K]
    assert first == ["w5", "w6", "w2", "w3"]


def test_patch_kl_reports_the_conversation_subsets(models):
    cc = random_crosscoder(6)
    data = [{"messages": CONVERSATION}, {"text": DOCS[0]}]
    result = cx.causal.patch_kl(*models, cc, LAYER, data, {"a": [0, 1]}, first_k=2, progress=False)
    text_positions = len(DOCS[0].split()) - 1
    for name in ("none", "all", "a"):
        assert result.kl[name]["first_k"][2] == 4 and result.kl[name]["rest"][2] == 4
        assert result.kl[name]["all"][2] == 8 + text_positions
    payload = result.to_json()
    assert payload["kl"]["none"]["first_k"]["n"] == 4 and payload["variant"] == "replace"
    assert "none" in result.table()


# ------------------------------------------------------------------------------------------------ latent sets


def test_paper_latent_sets():
    F = 40
    cc = cx.CrossCoder(8, F, 2, activation="relu")
    with torch.no_grad():
        cc.W_dec[:, 0] *= torch.linspace(1.0, 0.0, F)[:, None]  # latent j: Delta_norm rises with j
    dn = cx.delta_norm(cc)
    nu_e = torch.linspace(1.5, 0.0, F).double()
    nu_r = torch.linspace(0.0, 1.5, F).double().flip(0) * 0.5
    nu_e[-1] = math.nan  # never fired
    nu_r[-2] = 5.0  # outside the paper's range
    scaling = cx.LatentScalingResult(
        beta={},
        nu_error=nu_e,
        nu_reconstruction=nu_r,
        latents=torch.arange(F),
        activation_count=torch.ones(F, dtype=torch.int64),
        activation_sum=torch.ones(F, dtype=torch.float64),
        tokens=100,
        probe=1,
        targets=("reconstruction", "error"),
    )
    sets = cx.causal.paper_latent_sets(cc, scaling, min_delta_norm=0.6, n_random=2)
    leaning = [j for j in range(F) if dn[j] >= 0.6]
    valid = [j for j in leaning if j not in (F - 1, F - 2)]
    half = len(valid) // 2
    assert {len(v) for v in sets.values()} == {half}
    by_dn = sorted(valid, key=lambda j: -float(dn[j]))
    assert sets["delta_norm_better"].tolist() == by_dn[:half]
    assert sets["delta_norm_worse"].tolist() == by_dn[-half:]
    # Both nu fall with j here, so the highest ids are the most chat-specific by Latent Scaling.
    assert sorted(sets["latent_scaling_better"].tolist()) == sorted(valid)[-half:]
    assert set(sets) >= {"random_0", "random_1"} and sets["random_0"].tolist() != sets["random_1"].tolist()
    with pytest.raises(InputError, match="halves need at least 2"):
        cx.causal.paper_latent_sets(cc, scaling, min_delta_norm=1.0)


# ------------------------------------------------------------------------------------------------- steering


def test_steer_and_ablate(models):
    (_, tok), (chat, _) = models
    cc = random_crosscoder(7)
    ids = torch.tensor([tok(DOCS[0])["input_ids"]])
    latents = [2, 5]
    vector = (torch.tensor([[1.5], [0.5]]) * cc.W_dec[latents, 1].detach() / cc.input_scale[1]).sum(0) * 2.0
    with torch.no_grad():
        h = chat(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
        handle = replace_output(chat, LAYER, h + vector)
        try:
            direct = chat(input_ids=ids).logits
        finally:
            handle.remove()
        with cx.steer(chat, cc, latents, layer=LAYER, scale=2.0, max_activation=[1.5, 0.5]) as added:
            steered = chat(input_ids=ids).logits
        torch.testing.assert_close(added, vector)
        torch.testing.assert_close(steered, direct, rtol=1e-5, atol=1e-5)
        with cx.steer(chat, cc, latents, layer=LAYER, scale=2.0, max_activation=[1.5, 0.5], mode="prompt"):
            first = chat(input_ids=ids).logits  # the prompt: steered
            longer = chat(input_ids=torch.cat([ids, ids[:, :3]], 1)).logits  # re-read without cache: prompt part
        torch.testing.assert_close(first, direct, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(longer[:, : ids.shape[1]], direct, rtol=1e-5, atol=1e-5)

        seen = []
        with cx.ablate(chat, cc, latents, layer=LAYER) as basis:
            handle = known_block(chat, LAYER).register_forward_hook(
                lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
            )
            try:
                out = chat.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            finally:
                handle.remove()
        assert out.shape[1] == ids.shape[1] + 3 and len(seen) == 3
        directions = cc.W_dec[latents, 1].detach()
        for hidden in seen:
            assert float((hidden @ directions.T).abs().max()) < 1e-4
        assert basis.shape == (16, 2)
        with cx.steer(chat, cc, latents, layer=LAYER, scale=4.0, max_activation=3.0):
            steered_gen = chat.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert steered_gen.shape == out.shape
    with pytest.raises(InputError, match="max_activation is required"):
        with cx.steer(chat, cc, latents, layer=LAYER):
            pass
    with pytest.raises(InputError, match="latents has ids outside"):
        with cx.ablate(chat, cc, [99], layer=LAYER):
            pass


# ------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any model's weights fails the test: the errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_bad_input_is_refused_before_any_model_runs(pair, tmp_path, no_weights):  # noqa: F811
    cc = random_crosscoder(8)
    base, chat = pair
    other = make_model(tmp_path / "other", 2, words=WORDS[:-3] + ["x", "y", "z"])
    cases = [
        (dict(chat=other), "tokenizers disagree"),
        (dict(layer=3), r"layer must be an int in \[0, 3\)"),
        (dict(crosscoder=cx.CrossCoder(8, 24, 2, activation="relu")), "d_model is 8, the models' width is 16"),
        (dict(crosscoder=cx.CrossCoder(16, 24, 3, activation="relu")), "over 2 models"),
        (dict(sets={"a": []}), "latent set 'a' is empty"),
        (dict(sets={"a": [3, 24]}), r"ids outside \[0, 24\): \[24\]"),
        (dict(sets={"all": [1]}), "reserved"),
        (dict(data=[[{"role": "user", "content": "w1"}]]), "document 0 is a conversation without an assistant"),
        (dict(data=[]), "no documents"),
        (dict(variant="swap"), "variant must be one of"),
    ]
    for change, message in cases:
        args = dict(base=base, chat=chat, crosscoder=cc, layer=LAYER, data=DOCS, sets={"a": [1]}) | change
        with pytest.raises(InputError, match=message):
            cx.causal.patch_kl(
                args["base"],
                args["chat"],
                args["crosscoder"],
                args["layer"],
                args["data"],
                args["sets"],
                variant=change.get("variant", "replace"),
                progress=False,
            )
    with pytest.raises(MissingInputError, match="does not exist"):
        cx.causal.attribution(str(tmp_path / "missing"), chat, cc, LAYER, DOCS)


# ------------------------------------------------------------------------------------------- command line


def test_command_line_causal_and_steer(pair, tmp_path, capsys):  # noqa: F811
    from crossdiff_ext import cli
    from crossdiff_ext.data import activations

    cc = random_crosscoder(9)
    cc.save_pretrained(tmp_path / "cc")
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS) + "\n")
    store = activations.collect(pair[0], pair[1], LAYER, str(data), tmp_path / "store", device="cpu", progress=False)
    sets = tmp_path / "sets.json"
    sets.write_text('{"pair": [0, 1], "random_0": [2, 3], "random_1": [4, 5]}')
    common = ["--checkpoint", str(tmp_path / "cc"), "--base", pair[0], "--chat", pair[1], "--layer", str(LAYER)]
    out = tmp_path / "causal.json"
    assert (
        cli.main(
            [
                "causal",
                *common,
                "--data",
                str(data),
                "--latents",
                str(sets),
                "--out",
                str(out),
                "--quiet",
                "--attribution",
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert set(payload["kl"]) == {"none", "all", "pair", "random_0", "random_1", "random"}
    assert payload["kl"]["random"]["all"]["n"] == 2 * payload["kl"]["pair"]["all"]["n"]
    assert len(payload["attribution"]) == cc.dict_size and payload["latent_sets"]["pair"] == [0, 1]
    assert "positions: all" in capsys.readouterr().out

    page = tmp_path / "report.html"
    report = ["report", "--checkpoint", str(tmp_path / "cc"), "--store", str(store.path), "--out", str(page)]
    assert cli.main([*report, "--causal", str(out), "--quiet"]) == 0
    text = page.read_text()
    assert "Causal patching" in text and "alt='KL per latent set'" in text and "<th>causal score</th>" in text

    paper = tmp_path / "paper.json"
    args = ["causal", *common, "--data", str(data), "--store", str(store.path), "--min-delta-norm", "0", "--out"]
    assert cli.main([*args, str(paper), "--quiet"]) == 0
    assert {"delta_norm_better", "latent_scaling_worse", "random"} <= set(json.loads(paper.read_text())["kl"])

    steer = ["steer", "--checkpoint", str(tmp_path / "cc"), "--model", pair[1], "--layer", str(LAYER)]
    steer += ["--latents", "0", "1", "--prompt", DOCS[0], "--max-new-tokens", "2"]
    assert cli.main([*steer, "--max-activation", "2.0", "--scale", "3"]) == 0
    assert cli.main([*steer, "--store", str(store.path)]) == 0
    assert cli.main([*steer, "--ablate"]) == 0
    printed = capsys.readouterr().out
    assert "steered x3.0" in printed and "ablated:" in printed
    assert cli.main(steer) == 2
    assert "steering needs one of --max-activation or --store" in capsys.readouterr().err
    assert cli.main(["causal", *common, "--data", str(data), "--out", str(tmp_path / "x.json")]) == 2
    assert cli.main([*args, str(tmp_path / "no" / "x.json"), "--quiet"]) == 2
    assert (
        cli.main(
            [
                "causal",
                *common,
                "--layer",
                "7",
                "--data",
                str(data),
                "--latents",
                str(sets),
                "--out",
                str(tmp_path / "y.json"),
            ]
        )
        == 2
    )
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("crossdiff causal: error: ") for line in errors)
    assert "layer must be an int in [0, 3)" in errors[2]
