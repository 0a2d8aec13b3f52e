"""What causal patching and the stopped forward cost, against plain forwards of the same models in the same run.

Per model shape (random Llama weights: the cost does not depend on them), on one batch of random token ids:
- plain: one forward of the chat model (no hooks), the unit everything is measured in;
- per latent set: the marginal cost of one more latent set in cx.causal.patch_kl, (T(5 sets) - T(1 set)) / 4, as
  a ratio to plain (the goal: at most 1.3);
- attribution: cx.causal.attribution on the batch, as a ratio to plain;
- stopped forward: models.blocks.run_to_layer up to the crosscoder's layer against the full forward with
  output_hidden_states (how collect ran before it stopped at the hooked layer), with the FLOP ratio of the two
  (2 x the parameters each token passes through plus 4 T d per block for attention scores and mixing, and
  2 d V for the LM head) as the ceiling on the speedup.

    python -m kernels_bench causal_cost            # writes results/cpu-causal.{json,md}
    python -m kernels_bench causal_cost --quick    # small and short, writes nothing unless --out
"""

import argparse
import os
import sys
from dataclasses import asdict, dataclass

import torch

from . import timing

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Shape:
    """A Llama model shape and the batch it is timed on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    layer: int  # the crosscoder's (patched / stopped) layer
    batch: int = 8
    tokens: int = 128


SHAPES = [
    # The demo's pair (demo/toy_models.PairRecipe: width 64, 4 blocks) with its toy vocabulary size.
    Shape("demo pair", 64, 192, 4, 4, 256, 2),
    # A deeper model with a larger vocabulary, hooked in the middle as in the paper (Gemma 2 2B: block 13 of 26).
    Shape("deeper", 256, 768, 12, 8, 8192, 6),
]
QUICK = [Shape("quick", 32, 64, 4, 2, 128, 1, batch=2, tokens=16)]


def random_llama(shape, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.tokens,
    )
    return LlamaForCausalLM(config).eval()


def forward_flops(model, shape, upto=None):
    """FLOPs per batch of a forward through blocks 0..upto (all, with the head, when upto is None)."""
    from crossdiff_ext.models.blocks import decoder_blocks

    blocks = decoder_blocks(model)
    per_token_block = 2 * sum(p.numel() for p in blocks[0].parameters())
    attention = 4 * shape.tokens * shape.hidden  # scores and weighted sum per token per block (causal: half, x2)
    count = len(blocks) if upto is None else upto + 1
    per_token = count * (per_token_block + attention // 2)
    if upto is None:
        per_token += 2 * shape.hidden * shape.vocab
    return per_token * shape.batch * shape.tokens


class IdTokenizer:
    """The least patch_kl needs of a tokenizer for (model, tokenizer) pairs given as token-id documents."""

    pad_token_id = 0

    def __init__(self, vocab):
        self.vocab = {f"t{i}": i for i in range(vocab)}

    def get_vocab(self):
        return self.vocab

    def __call__(self, text):
        return {"input_ids": [int(t[1:]) for t in text.split()]}


def measure(shape, reps):
    import crossdiff_ext as cx
    from crossdiff_ext.models.blocks import run_to_layer

    base, chat = random_llama(shape, 0), random_llama(shape, 1)
    tokenizer = IdTokenizer(shape.vocab)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.tokens), generator=g)
    docs = [" ".join(f"t{int(t)}" for t in row) for row in ids]
    cc = cx.CrossCoder(shape.hidden, 4 * shape.hidden, 2, k=8).eval()
    cc.threshold.fill_(0.0)
    sets = {f"set_{i}": torch.arange(i * 8, i * 8 + 8) for i in range(5)}
    pair = ((base, tokenizer), (chat, tokenizer))
    attention = torch.ones_like(ids)

    def patch(n):
        chosen = dict(list(sets.items())[:n])
        return lambda: cx.causal.patch_kl(
            *pair, cc, shape.layer, docs, chosen, batch_size=shape.batch, ignore_first=1, progress=False
        )

    def plain():
        with torch.no_grad():
            chat(input_ids=ids, attention_mask=attention, use_cache=False)

    def full_hidden():
        with torch.no_grad():
            chat(input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False)

    cases = {
        "plain forward": plain,
        "patch_kl, 1 set": patch(1),
        "patch_kl, 5 sets": patch(5),
        "attribution": lambda: cx.causal.attribution(*pair, cc, shape.layer, docs, batch_size=shape.batch),
        "full forward, hidden states": full_hidden,
        "forward to layer": lambda: run_to_layer(chat, shape.layer, input_ids=ids, attention_mask=attention),
    }
    samples = timing.alternate(cases, reps)
    median = {name: timing.summarize(s)["median_ms"] for name, s in samples.items()}
    per_set = (median["patch_kl, 5 sets"] - median["patch_kl, 1 set"]) / 4
    flop_ratio = forward_flops(chat, shape) / forward_flops(chat, shape, shape.layer)
    speedup = median["full forward, hidden states"] / median["forward to layer"]
    return dict(
        shape=asdict(shape),
        median_ms=median,
        per_set_ms=per_set,
        per_set_over_plain=per_set / median["plain forward"],
        attribution_over_plain=median["attribution"] / median["plain forward"],
        stop_speedup=speedup,
        flop_ratio=flop_ratio,
        speedup_over_flop_ratio=speedup / flop_ratio,
        reps=reps,
    )


def markdown(record):
    lines = [
        "# Causal patching and the stopped forward: cost against plain forwards",
        "",
        f"Machine: {record['machine']['device']}, torch {record['machine']['torch']}, "
        f"{record['machine']['torch_threads']} threads; commit {record['commit']}.",
        f"Command: `{record['command']}`. Medians of {record['rows'][0]['reps']} alternating rounds.",
        "",
        "| shape | plain forward ms | one more latent set ms | set / plain | attribution / plain "
        "| stopped forward speedup | FLOP ratio | speedup / FLOP ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        s = r["shape"]
        lines.append(
            f"| {s['name']} (d {s['hidden']}, {s['layers']} blocks, V {s['vocab']}, layer {s['layer']}, "
            f"{s['batch']}x{s['tokens']} tokens) | {r['median_ms']['plain forward']:.1f} | {r['per_set_ms']:.1f} "
            f"| {r['per_set_over_plain']:.2f} | {r['attribution_over_plain']:.2f} | {r['stop_speedup']:.2f} "
            f"| {r['flop_ratio']:.2f} | {r['speedup_over_flop_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels_bench causal_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 2 rounds")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None, help="results path without extension (default results/cpu-causal)")
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else SHAPES
    reps = args.reps or (2 if args.quick else 7)
    rows = [measure(shape, reps) for shape in shapes]
    record = dict(
        machine=timing.machine_info(),
        commit=timing.git_commit(),
        command="python -m kernels_bench causal_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        rows=rows,
    )
    text = markdown(record)
    print(text)
    out = args.out or (None if args.quick else os.path.join(RESULTS, "cpu-causal"))
    if out:
        timing.write_json_atomic(out + ".json", record)
        timing.write_atomic(out + ".md", text)
    return record


if __name__ == "__main__":
    main()
