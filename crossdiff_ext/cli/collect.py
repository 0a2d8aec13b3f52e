"""`crossdiff collect`: paired activations of a base and a fine-tuned model -> an activation store (one per
layer)."""

import argparse
from typing import Sequence, Union

import torch

from ..data import activations
from ..data.corpus import parse_source_spec
from ..data.store import ActivationStore
from ..errors import InputError
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
        nargs="+",
        metavar="SOURCE[:WEIGHT]",
        help="JSONL ({'text'} or {'messages'} per line), .txt, a directory of those; a dataset streamed with the "
        "datasets package: a Hub name (with --split), a local parquet / arrow / csv file or directory, or "
        "hf:NAME[:SPLIT]. Several: a mixture drawn with --seed, each SOURCE:WEIGHT (no weights: equal shares)",
    )
    p.add_argument("--split", default=None, help="split of a dataset source (default: train)")
    p.add_argument("--subset", default=None, help="configuration of a Hub dataset (e.g. sample-10BT)")
    p.add_argument(
        "--column", default=None, help="column read as the document (default: messages, conversation, then text)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a mixture's draw (the same seed, the same documents)")
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


def data_argument(specs: Sequence[str]) -> Union[str, list[tuple[str, float]]]:
    """--data as collect takes it: one source as it is, several as a mixture [(source, weight), ...].

    Args:
        specs: The SOURCE[:WEIGHT] arguments.

    Returns:
        The source, or the list of (source, weight) pairs.

    Raises:
        InputError: Some sources have a weight and others not.
    """
    parsed = [parse_source_spec(s) for s in specs]
    if len(parsed) == 1:
        return parsed[0][0]
    weighted = [w is not None for _, w in parsed]
    if any(weighted) and not all(weighted):
        missing = [s for s, w in parsed if w is None]
        raise InputError(f"--data: give every source of a mixture a weight (SOURCE:WEIGHT) or none; {missing} lack one")
    return [(s, 1.0 if w is None else w) for s, w in parsed]


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
        data_argument(args.data),
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
        split=args.split,
        subset=args.subset,
        column=args.column,
        seed=args.seed,
    )
    stores = store if isinstance(store, dict) else {args.layer[0]: store}
    for layer, one in stores.items():
        print(f"{one.path}: {len(one)} tokens of layer {layer}, [2, {one.d_model}] each, {one.meta['dtype']}")
        if one.source_names is not None and len(one.source_names) > 1:
            print(f"  tokens per source: {token_shares(one)}")
    return 0


def token_shares(store: ActivationStore) -> str:
    """The store's tokens per source, with their shares (a mixture's weights are shares of documents).

    Args:
        store: A store that records its rows' sources.

    Returns:
        "NAME: n (share), ..." in source order.
    """
    counts = torch.bincount(store.sources(), minlength=len(store.source_names)).tolist()
    total = max(sum(counts), 1)
    return ", ".join(f"{name}: {n} ({n / total:.1%})" for name, n in zip(store.source_names, counts))
