"""A crosscoder's readouts for the grader: the most fine-tune-leaning live latents in Delta_norm order (dead ones left
out), the logit lens of their fine-tuned decoder rows against a direct final-norm-and-head computation, and their
top contexts as max_activating_examples finds them."""

import pytest
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext.data import activations
from crossdiff_ext.diffing import examples
from crossdiff_ext.errors import InputError
from crossdiff_ext.truth import readouts

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1


@pytest.fixture(scope="module")
def store(pair, tmp_path_factory):
    import tiny_models

    root = tmp_path_factory.mktemp("readouts")
    corpus = tiny_models.write_corpus(root)
    return activations.collect(pair[0], pair[1], LAYER, corpus, root / "store", device="cpu", progress=False)


def _crosscoder(store, salt):
    g = rng(salt)
    cc = cx.CrossCoder(d_model=store.d_model, dict_size=24, n_models=2, k=3)
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=g))
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=g))
        cc.threshold.fill_(0.0)
    cc.eval()
    return cc


def test_the_most_fine_tune_leaning_live_latents_come_in_delta_norm_order(store):
    cc = _crosscoder(store, 3300)
    dead = 5
    with torch.no_grad():
        cc.W_dec[:, 0] *= torch.rand(cc.dict_size, 1, generator=rng(3301))  # spread Delta_norm over (0.5, 1)
        cc.W_dec[dead, 0] = 0.0  # Delta_norm 1: the most fine-tune-leaning of all, but it never fires
        cc.W_enc[dead] = 0.0
        cc.b_enc[dead] = -1.0
    live = readouts.fired_latents(cc, store)
    assert not live[dead] and live.sum() >= 8
    ids, dn = readouts.fine_tune_leaning_latents(cc, store, 8)
    expected = cx.delta_norm(cc)
    ranked = [j for j in torch.argsort(expected, descending=True, stable=True).tolist() if live[j]][:8]
    assert ids == ranked and dead not in ids
    assert dn == pytest.approx([float(expected[j]) for j in ids])
    assert dn == sorted(dn, reverse=True)
    with pytest.raises(InputError, match="n must be an int >= 1"):
        readouts.fine_tune_leaning_latents(cc, store, 0)


def test_readouts_are_the_fine_tuned_models_lens_of_each_row_and_the_top_contexts(pair, store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cc = _crosscoder(store, 3302)
    latents = readouts.fine_tune_leaning_latents(cc, store, 4)[0]
    got = readouts.crosscoder_readouts(cc, store, pair[1], latents, top=5, n_contexts=3)
    model = AutoModelForCausalLM.from_pretrained(pair[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair[1])
    with torch.no_grad():  # the chat model's own final norm and head, applied directly
        logits = model.lm_head(model.model.norm(cc.W_dec[latents, 1].float()))
    found = examples.max_activating_examples(cc, store, latents, n=3, quantiles=())
    assert [r.latent for r in got] == latents
    for readout, row, j in zip(got, logits, latents):
        assert list(readout.tokens) == tokenizer.convert_ids_to_tokens(row.topk(5).indices.tolist())
        assert list(readout.contexts) == [tokenizer.decode(e.tokens) for e in found[j].top]
        assert 1 <= len(readout.contexts) <= 3


def test_bad_latents_and_a_model_of_another_width_are_refused(pair, store):
    cc = _crosscoder(store, 3303)
    with pytest.raises(InputError, match=r"latents must be ids in \[0, 24\)"):
        readouts.crosscoder_readouts(cc, store, pair[1], [24])
    wide = cx.CrossCoder(d_model=store.d_model + 1, dict_size=24, n_models=2, k=3)
    with pytest.raises(InputError, match="fine-tuned model's width is 16, expected 17"):
        readouts.crosscoder_readouts(wide, store, pair[1], [0])
