"""`crossdiff demo`: the whole diffing job on a tiny base/chat pair (or real models): collect, train BatchTopK and
L1, Latent Scaling, reports (demo/demo.py); prints its summary."""

import argparse
import json

from ..demo import demo as dm
from .common import output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the demo's flags."""
    p.add_argument(
        "--out", default="crossdiff_demo", help="output directory (store, checkpoints, reports, summary.json)"
    )
    p.add_argument("--base", default=None, help="base model (directory or hub name); default: the embedded toy pair")
    p.add_argument("--chat", default=None, help="fine-tuned model (directory or hub name)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="residual stream after this block (default for the toy pair: the middle one; required with --base/--chat)",
    )
    p.add_argument("--text-documents", type=int, default=1200, help="generated plain-text documents to collect on")
    p.add_argument("--chat-documents", type=int, default=1200, help="generated conversations to collect on")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--dict-size", type=int, default=None, help="default: 8 x the model width")
    p.add_argument("-k", type=int, default=None, help="BatchTopK k (default: max(8, width / 24))")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--l1-coefficient", type=float, default=0.041, help="mu of the L1 crosscoder (squared error, as in the paper)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--causal-conversations",
        type=int,
        default=200,
        help="held-out conversations of the causal patching experiment (0: skip it)",
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the same table on any core count; 0: torch's default)",
    )
    p.add_argument(
        "--rebuild-pair",
        action="store_true",
        help="build the toy pair from its recipe on this machine (minutes; cached) instead of loading the shipped one",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo job and print its summary. Returns the exit status."""
    config = dm.DemoConfig(
        out=args.out,
        base=args.base,
        chat=args.chat,
        layer=args.layer,
        text_documents=args.text_documents,
        chat_documents=args.chat_documents,
        max_tokens=args.max_tokens,
        dict_size=args.dict_size,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        l1_coefficient=args.l1_coefficient,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        causal_conversations=args.causal_conversations,
        threads=args.threads or None,
        rebuild_pair=args.rebuild_pair,
    )
    config.validate()
    output_dir(args.out)
    summary = dm.run(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(dm.describe(summary)))
    return 0
