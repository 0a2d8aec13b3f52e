"""Output differences on tiny random Llama models: the KL per position and the mean log-probability rise against
per-document full forwards, the contexts of largest KL, and a fine-tune that plants a token found at the top of
the rising tokens and of the Activation Difference Lens's logit lens (and by neither on a fine-tune that plants
nothing)."""

import copy

import pytest
import torch
import transformers
from conftest import rng
from tiny_models import WORDS, make_tokenizer

import crossdiff_ext as cx
from crossdiff_ext.errors import InputError

# The models here are 16 wide: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed, init=0.3):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=init,
    )
    return transformers.LlamaForCausalLM(config).eval(), make_tokenizer()


def texts(salt, n=10, low=1, high=15, words=range(50)):
    g = rng(salt)
    words = list(words)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [" ".join(f"w{words[int(i)]}" for i in torch.randint(0, len(words), (k,), generator=g)) for k in lengths]


def test_kl_per_position_and_the_rise_equal_per_document_forwards():
    base, chat = tiny(0), tiny(1)
    docs = texts(1)
    result = cx.logit_diff(base, chat, docs, context_length=9, batch_size=3, top_k=len(WORDS), n_contexts=4)
    gaps, kls = [], []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([base[1](doc)["input_ids"][:9]])
            logp_b = torch.log_softmax(base[0](input_ids=ids).logits[0].float(), -1)
            logp_c = torch.log_softmax(chat[0](input_ids=ids).logits[0].float(), -1)
            kls.append(torch.nn.functional.kl_div(logp_b, logp_c, log_target=True, reduction="none").sum(-1))
            gaps.append(logp_c - logp_b)
    assert len(result.kl) == len(docs) and result.documents == len(docs)
    for got, expected in zip(result.kl, kls):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.rise, torch.cat(gaps).mean(0), rtol=1e-4, atol=1e-5)
    assert result.positions == sum(len(k) for k in kls)
    assert result.mean_kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)
    assert [t["id"] for t in result.top_tokens[:5]] == torch.cat(gaps).mean(0).argsort(descending=True)[:5].tolist()

    # The largest KLs in order. Two documents that start with the same word tie at position 0, and a tie may come
    # in either order: each context is checked against its own document and position.
    flat = sorted((float(k[t]) for k in kls for t in range(len(k))), reverse=True)
    assert len(result.top_contexts) == 4
    for context, kl in zip(result.top_contexts, flat):
        d, t = context["document"], context["position"]
        assert context["kl"] == pytest.approx(kl, rel=1e-4) == pytest.approx(float(kls[d][t]), rel=1e-4)
        assert context["context"] == base[1].decode(base[1](docs[d])["input_ids"][: t + 1])
    assert len(result.to_json()["kl"]) == len(docs)


def fine_tune(model, docs, tokenizer, steps, lr=5e-2):
    """A copy of the model trained by next-token loss on the documents."""
    tuned = copy.deepcopy(model).train()
    batch = tokenizer(docs, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(steps):
        loss = tuned(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned.eval()


def test_a_strongly_planted_token_is_found_and_a_null_fine_tune_plants_nothing():
    base, tokenizer = tiny(2, init=0.02)
    generic = texts(3, n=16, low=6, high=12, words=range(40))
    g = rng(5)
    planted = [  # the planted word after about a third of the words
        " ".join(w + (" w45" if float(torch.rand(1, generator=g)) < 0.35 else "") for w in doc.split())
        for doc in generic
    ]
    implant = fine_tune(base, planted, tokenizer, steps=10)
    null = fine_tune(base, generic, tokenizer, steps=10)
    probe = texts(4, n=12, low=4, high=10, words=range(40))  # generic text the fine-tunes never saw

    found = cx.logit_diff((base, tokenizer), (implant, tokenizer), probe, top_k=5)
    assert found.top_tokens[0]["token"] == "w45"
    control = cx.logit_diff((base, tokenizer), (null, tokenizer), probe, top_k=5)
    assert "w45" not in [t["token"] for t in control.top_tokens]

    # The Activation Difference Lens reads it too: the logit lens of every position's mean difference ranks it
    # first or second (measured: first at 77 of 80 positions over 20 seeds, second at the other 3).
    lens = cx.adl((base, tokenizer), (implant, tokenizer), probe, n_positions=4, top_k=2).logit_lens
    assert all("w45" in [t["token"] for t in p["top"]] for p in lens)
    lens = cx.adl((base, tokenizer), (null, tokenizer), probe, n_positions=4, top_k=5).logit_lens
    assert not any("w45" in [t["token"] for t in p["top"]] for p in lens)


def test_bad_input_is_refused(pair):
    with pytest.raises(InputError, match="data holds no documents"):
        cx.logit_diff(*pair, [])
    with pytest.raises(InputError, match="context_length must be an int >= 1"):
        cx.logit_diff(*pair, ["w1"], context_length=0)
    padded, tokenizer = tiny(1)
    padded.resize_token_embeddings(len(WORDS) + 3)  # a padded vocabulary: more logits than the other model's
    with pytest.raises(InputError, match="output vocabularies differ"):
        cx.logit_diff(tiny(0), (padded, tokenizer), ["w1"])
