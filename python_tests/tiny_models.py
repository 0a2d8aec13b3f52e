"""Tiny random transformers models and corpora for the tests that run real models: a word-level tokenizer with a
chat template, seeded 3-block Llama models saved to disk, a small JSONL corpus (conftest's `pair` and `data`
fixtures), and a model that reads the demo's toy language."""

import json

import torch

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(50)]


def make_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = "<bos> {% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    return fast


def save_llama(path, seed, tokenizer, **config):
    """A random Llama (seeded, 2 heads) with `tokenizer`, saved at path: its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), num_attention_heads=2, num_key_value_heads=2, **config)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_model(path, seed, words=WORDS):
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, max_position_embeddings=64)
    return save_llama(path, seed, make_tokenizer(words), **shape)


def make_toy_language_model(path, seed):
    """A tiny random Llama (2 blocks, width 32) that reads the demo's word-level toy language (what the organisms
    of language "toy" are built from): its path."""
    from crossdiff_ext.demo import toy_language

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    return save_llama(
        path, seed, toy_language.make_tokenizer(), bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape
    )


def make_pair(root):
    """A base and a chat model (seeds 0 and 1) saved under root: their paths."""
    return make_model(root / "base", 0), make_model(root / "chat", 1)


def write_corpus(tmp_path):
    """12 JSONL documents, every third a conversation: the file's path."""
    g = torch.Generator().manual_seed(7)
    lines = []
    for i in range(12):
        words = " ".join(
            f"w{int(j)}" for j in torch.randint(0, 50, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
        )
        if i % 3 == 0:
            lines.append(
                json.dumps(
                    {"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": "w1 w2"}]}
                )
            )
        else:
            lines.append(json.dumps({"text": "<bos> " + words}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
