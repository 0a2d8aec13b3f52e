"""The Activation Difference Lens on tiny random Llama models: the mean difference against full forwards'
hidden states, the logit lens through the fine-tuned model's own norm and head, Patchscope's write position and
scale rule, the steering search against its coherence criterion recomputed by hand, and bad input refused before
any weights load."""

import math
import re

import pytest
import torch
import transformers
from conftest import rng
from tiny_models import WORDS, make_model, make_tokenizer

import crossdiff_ext as cx
from crossdiff_ext.diffing import coherent_steering, lens
from crossdiff_ext.errors import InputError

# The models here are 16 wide: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed, init=0.02, width=16):
    """A loaded (model, tokenizer) pair: a random 3-block Llama over the tiny vocabulary."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=init,
    )
    return transformers.LlamaForCausalLM(config).eval(), make_tokenizer()


def texts(salt, n=9, low=1, high=12):
    """Random documents of the tiny vocabulary, of different lengths (some shorter than the positions read)."""
    g = rng(salt)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (k,), generator=g)) for k in lengths]


def block_output(model, ids, layer):
    """Block `layer`'s output: hidden_states[layer + 1] of a full forward, or for the last block (whose entry there
    has the final norm applied) a hook on it."""
    if layer < model.config.num_hidden_layers - 1:
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
    kept = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: kept.append(out))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return (kept[0][0] if isinstance(kept[0], tuple) else kept[0])[0]


@pytest.mark.parametrize("layer", [None, 0, 2])
def test_the_mean_difference_equals_full_forwards_hidden_states(layer):
    base, chat = tiny(0), tiny(1)
    docs = texts(10 + (layer or 0)) + ["w1"]  # one document of a single token
    n = 6
    result = cx.adl(base, chat, docs, layer=layer, n_positions=n, batch_size=4)
    read = 1 if layer is None else layer  # the middle of 3 blocks
    assert result.layer == read

    sums, counts, norms = torch.zeros(n, 16, dtype=torch.float64), torch.zeros(n), []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([base[1](doc)["input_ids"][:n]])
            h_b, h_c = block_output(base[0], ids, read), block_output(chat[0], ids, read)
            sums[: ids.shape[1]] += (h_c - h_b).double()
            counts[: ids.shape[1]] += 1
            norms.append(h_c.norm(dim=-1))
    torch.testing.assert_close(result.delta, (sums / counts[:, None]).float(), rtol=1e-5, atol=1e-6)
    assert result.counts.tolist() == counts.long().tolist()
    assert result.typical_norm == pytest.approx(float(torch.cat(norms).median()), rel=1e-5)
    assert len(result.logit_lens) == len(result.patchscope) == n and result.steering is None
    assert result.to_json()["delta_norm"] == pytest.approx(result.delta.norm(dim=-1).tolist())


def test_the_logit_lens_reads_through_the_fine_tuned_models_norm_and_head():
    base, chat = tiny(2), tiny(3)
    g = rng(20)
    with torch.no_grad():  # heads and final norms far apart: reading through the wrong model shows
        chat[0].model.norm.weight.copy_(torch.rand(16, generator=g) * 3)
        chat[0].lm_head.weight.copy_(torch.randn(len(WORDS), 16, generator=g))
    result = cx.adl(base, chat, texts(21), n_positions=3, top_k=len(WORDS))
    with torch.no_grad():
        expected = chat[0].lm_head(chat[0].model.norm(result.delta))
        from_base = base[0].lm_head(base[0].model.norm(result.delta))
    for p in range(3):
        scores = torch.zeros(len(WORDS))
        for t in result.logit_lens[p]["top"]:
            scores[t["id"]] = t["score"]
        torch.testing.assert_close(scores, expected[p], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(scores, from_base[p], atol=1e-2)
        assert [t["id"] for t in result.logit_lens[p]["bottom"]][:3] == expected[p].argsort()[:3].tolist()


def hooked_next_token(model, ids, layer, position, vector):
    """The next-token distribution with block `layer`'s output at `position` replaced by vector (own hook)."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, position] = vector
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    finally:
        handle.remove()


def test_patchscope_writes_at_the_placeholder_and_reads_the_last_position():
    model, tokenizer = tiny(4, init=0.5)
    prompt = "w1 w1 : w2 w2 : w3 w3 : w9 :"  # word-level tokens: the placeholder w9 is token 9
    vector = torch.randn(16, generator=rng(30))
    scales, norm = [0.5, 2.0], 3.0
    (result,) = lens.patchscope(
        model, tokenizer, vector, 1, norm, scales=scales, prompt=prompt, placeholder="w9", control_word="w5", top_k=100
    )
    assert result.position == 9
    ids = tokenizer(prompt)["input_ids"]
    for i, s in enumerate(scales):
        written = s * norm * vector / vector.norm()
        expected = hooked_next_token(model, ids, 1, 9, written)
        got = torch.zeros(len(WORDS))
        for t in result.tokens[i]:
            got[t["id"]] = t["score"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, hooked_next_token(model, ids, 1, 8, written), atol=1e-4)
        assert result.entropy[i] == pytest.approx(float(-(expected * expected.log()).sum()), rel=1e-4)


def reads_back(seed):
    """A model that reads a written vector back: tied embeddings of norm ~4 and blocks of weights ~0.002, so the
    last position's logits are about E . norm(h), largest for the token whose embedding h is."""
    model, tokenizer = tiny(seed, init=0.002)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(generator=rng(seed))
    return model, tokenizer


@pytest.mark.parametrize("prompt, parses", [("w1 w1 : w2 w2 : w9", True), ("w1 w1 : w2 w2 : w9 :", False)])
def test_the_control_parses_where_the_written_vector_is_read_back(prompt, parses):
    model, tokenizer = reads_back(31)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    scales = [0.5, 1.0, 4.0]
    (result,) = lens.patchscope(
        model,
        tokenizer,
        torch.randn(16, generator=rng(32)),
        1,
        3.0,
        scales=scales,
        prompt=prompt,
        placeholder="w9",
        control_word="w5",
    )
    # Written at the last position, the control's own representation comes back as w5 at every scale; written
    # before the last position, the model reads ":" there and answers from it, not from the control.
    assert result.parses == [parses] * 3
    chosen = lens.choose_scale(scales, result.entropy, result.parses)
    assert result.chosen_scale == (scales[chosen] if parses else None)
    assert result.chosen_tokens == (result.tokens[chosen] if parses else [])


def test_the_scale_rule_takes_the_lowest_entropy_among_the_scales_that_parse():
    scales = [0.5, 1.0, 2.0, 4.0]
    assert lens.choose_scale(scales, [0.1, 2.0, 1.0, 1.0], [False, True, True, True]) == 2  # tie: smaller scale
    assert lens.choose_scale(scales, [3.0, 0.5, 0.2, 0.9], [True, True, False, True]) == 1
    assert lens.choose_scale(scales, [1.0, 1.0, 1.0, 1.0], [False] * 4) is None


def steered_continuation(model, ids, layer, added, n):
    """Greedy continuation with `added` on the block's output at every position (own hook, own loop, no cache)."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        return ((h + added,) + tuple(output[1:])) if isinstance(output, tuple) else h + added

    handle = model.model.layers[layer].register_forward_hook(hook)
    seq = list(ids)
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                logits[model.config.eos_token_id] = -math.inf  # continuations have exactly n tokens
                seq.append(int(logits.argmax()))
    finally:
        handle.remove()
    return seq[len(ids) :]


def mean_nll(model, ids, continuation):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids) + continuation])).logits[0].float()
    logp = torch.log_softmax(logits[len(ids) - 1 : -1], -1)
    return float(-logp[torch.arange(len(continuation)), torch.tensor(continuation)].mean())


def test_the_steering_search_keeps_the_largest_scale_its_criterion_accepts():
    model, tokenizer = tiny(5, init=0.5)
    vector = torch.randn(16, generator=rng(40))
    prompts = ["w1 w2 w3", "w7 w8"]
    factor, n, norm = 1.3, 4, 2.0
    result = coherent_steering.steer_coherently(
        model, tokenizer, vector, 1, prompts, norm, factor=factor, max_scale=40.0, steps=3, max_new_tokens=n
    )
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    plain = [steered_continuation(model, i, 1, torch.zeros(16), n) for i in ids]
    baseline = sum(mean_nll(model, i, c) for i, c in zip(ids, plain)) / len(ids)
    assert result.unsteered_nll == pytest.approx(baseline, rel=1e-4)
    for probe in result.probes:  # every verdict agrees with the criterion recomputed by hand
        added = probe["scale"] * norm * vector / vector.norm()
        steered = [steered_continuation(model, i, 1, added, n) for i in ids]
        nll = sum(mean_nll(model, i, c) for i, c in zip(ids, steered)) / len(ids)
        assert probe["nll"] == pytest.approx(nll, rel=1e-4)
        assert probe["coherent"] == (nll <= factor * baseline)
    coherent = [p["scale"] for p in result.probes if p["coherent"]]
    incoherent = [p["scale"] for p in result.probes if not p["coherent"]]
    assert incoherent, "the strongest scale should break this model's text (the search is not exercised)"
    assert result.scale == max(coherent, default=0.0) < min(incoherent)
    assert len(result.probes) == 4 and result.nll_ratio <= factor
    assert result.alpha == pytest.approx(result.scale * norm)


def test_adl_steers_every_position_when_prompts_are_given():
    base, chat = tiny(6, init=0.5), tiny(7, init=0.5)
    result = cx.adl(
        base, chat, texts(50), n_positions=2, steering_prompts=["w3 w4"], steering_steps=1, steering_tokens=3
    )
    assert len(result.steering) == 2 and all(len(s.texts) == 1 for s in result.steering)
    assert all(s.nll_ratio <= s.factor for s in result.steering)


def test_a_model_against_itself_has_no_direction_to_read_and_is_not_an_error():
    # A fine-tune that changed nothing (here the same model twice): delta is zero, so Patchscope and steering have
    # no direction to write; they read None at every position instead of failing.
    model = tiny(8, init=0.5)
    result = cx.adl(model, model, texts(51), n_positions=2, steering_prompts=["w3 w4"], steering_steps=1)
    assert not bool(result.delta.any())
    assert result.patchscope == [None, None] and result.steering == [None, None]
    assert result.to_json()["patchscope"] == [None, None]


def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer=3), "layer must be an int in [0, 3)"),
        (dict(data=[]), "data holds no documents"),
        (dict(n_positions=0), "n_positions must be an int >= 1"),
        (dict(identity_prompt="w1 w2"), "does not hold the placeholder"),
        (dict(steering_prompts=[]), "steering_prompts must be a non-empty list"),
        (dict(patchscope_scales=[1.0, -2.0]), "patchscope_scales must be positive"),
        (dict(steering_prompts=["w1"], steering_factor=1.0), "steering_factor must be a number > 1"),
        (dict(steering_prompts=["w1"], steering_tokens=0), "steering_tokens must be an int >= 1"),
    ],
)
def test_bad_input_is_refused_before_weights_load(pair, monkeypatch, kwargs, message):
    no_weights(monkeypatch)
    args = {"data": ["w1 w2 w3"], **kwargs}
    with pytest.raises(InputError, match=re.escape(message)):
        cx.adl(*pair, **args)


def test_models_that_do_not_fit_are_refused_before_weights_load(pair, tmp_path, monkeypatch):
    other = make_model(tmp_path / "other", 2, words=WORDS + ["w99"])
    wide = tmp_path / "wide"
    tiny(8, width=24)[0].save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    no_weights(monkeypatch)
    with pytest.raises(InputError, match="tokenizers disagree"):
        cx.adl(pair[0], other, ["w1 w2"])
    with pytest.raises(InputError, match="widths differ"):
        cx.adl(pair[0], str(wide), ["w1 w2"])
    with pytest.raises(InputError, match="widths differ"):
        cx.logit_diff(pair[0], str(wide), ["w1 w2"])


def test_positions_beyond_every_document_are_refused():
    with pytest.raises(InputError, match="n_positions is 8, but the longest document has 3 tokens"):
        cx.adl(tiny(0), tiny(1), ["w1 w2 w3", "w4"], n_positions=8)
