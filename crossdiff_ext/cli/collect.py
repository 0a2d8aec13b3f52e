"""`crossdiff collect`: paired activations of a base and a fine-tuned model -> an activation store (one per
layer)."""

import argparse

from ..data import activations
from .common import at_least, output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register collect's flags."""
    p.add_argument("--base", required=True, help="base model: directory or hub name")
    p.add_argument("--chat", required=True, help="fine-tuned model: directory or hub name (its tokenizer is used)")
    p.add_argument(
        "--layer",
        type=int,
        nargs="+",
        required=True,
        help="residual stream after this block (0-based); several: one store per layer under --out, one pass",
    )
    p.add_argument(
        "--data",
        required=True,
        help="JSONL ({'text'} or {'messages'} per line), .txt, a directory of "
        "those, or hf:NAME[:SPLIT] (a Hugging Face dataset; needs the datasets package)",
    )
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--max-tokens", type=at_least(1), default=None)
    p.add_argument("--context-length", type=at_least(1), default=1024)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument(
        "--drop-first", type=at_least(0), default=1, help="tokens dropped at the start of every sequence (BOS)"
    )
    p.add_argument(
        "--pack-window",
        type=at_least(1),
        default=64,
        help="batches per window whose documents are sorted by length (1: none)",
    )
    p.add_argument(
        "--max-norm-ratio",
        type=float,
        default=None,
        help="drop rows whose norm exceeds this multiple of the batch's median row norm (e.g. 10; default: keep all)",
    )
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-rows", type=at_least(1), default=1 << 18)
    p.add_argument(
        "--device", nargs="+", default=None, help="one device for both models, or two: base chat (default: cuda if any)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Collect and print one line per store written. Returns the exit status."""
    output_dir(args.out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading weights) too
    store = activations.collect(
        args.base,
        args.chat,
        args.layer[0] if len(args.layer) == 1 else args.layer,
        args.data,
        args.out,
        max_tokens=args.max_tokens,
        context_length=args.context_length,
        batch_size=args.batch_size,
        drop_first=args.drop_first,
        pack_window=args.pack_window,
        max_norm_ratio=args.max_norm_ratio,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        device=None if args.device is None else args.device[0] if len(args.device) == 1 else args.device,
        resume=args.resume,
        progress=not args.quiet,
    )
    stores = store if isinstance(store, dict) else {args.layer[0]: store}
    for layer, one in stores.items():
        print(f"{one.path}: {len(one)} tokens of layer {layer}, [2, {one.d_model}] each, {one.meta['dtype']}")
    return 0
