"""`crossdiff logit-diff`: where a base model and its fine-tuned version disagree over a corpus (KL(P_ft || P_base)
per position) and which tokens the fine-tune made more likely -> a JSON file."""

import argparse

from .. import atomic
from ..diffing import output_difference
from .common import at_least, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register logit-diff's flags."""
    p.add_argument("--base", required=True, help="base model: directory or hub name")
    p.add_argument("--chat", required=True, help="fine-tuned model: directory or hub name (its tokenizer is used)")
    p.add_argument("--data", required=True, help="JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="logit_diff.json")
    p.add_argument("--context-length", type=at_least(1), default=128, help="tokens read per document")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--top-k", type=at_least(1), default=30, help="tokens listed")
    p.add_argument("--contexts", type=at_least(0), default=10, help="positions of largest KL listed")
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    """Compare, write the JSON and print the top tokens and contexts. Returns the exit status."""
    output_file(args.out)
    result = output_difference.logit_diff(
        args.base,
        args.chat,
        args.data,
        context_length=args.context_length,
        batch_size=args.batch_size,
        top_k=args.top_k,
        n_contexts=args.contexts,
        device=args.device,
    )
    atomic.write_json(args.out, result.to_json(), indent=1)
    print("tokens the fine-tune promotes: " + " ".join(repr(t["token"]) for t in result.top_tokens[:15]))
    for c in result.top_contexts[:5]:
        print(f"KL {c['kl']:.4f}  {c['context'][-60:]!r} -> ft {c['ft_token']!r}, base {c['base_token']!r}")
    print(f"{args.out}: mean KL(P_ft || P_base) {result.mean_kl:.4f} over {result.positions} positions")
    return 0
