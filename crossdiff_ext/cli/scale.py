"""`crossdiff scale`: Latent Scaling of every latent of a checkpoint on stores -> the latent table (CSV /
Parquet)."""

import argparse

from ..diffing import analysis
from ..diffing.by_source import add_source_columns, check_sources, firing_by_source
from ..diffing.report import scaled_table
from ..layer import CrossCoder
from .common import add_scoring_arguments, check_fits, open_stores, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register scale's flags."""
    add_scoring_arguments(p, "latents.csv / .parquet")
    p.add_argument(
        "--by-source",
        action="store_true",
        help="add each latent's firing per source of the stores' tokens (freq[SOURCE], share[SOURCE] columns)",
    )


def run(args: argparse.Namespace) -> int:
    """Scale, write the table and print its class counts. Returns the exit status."""
    output_file(args.out)
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = open_stores(args.store)
    check_fits(cc, args.checkpoint, stores[0])
    if args.by_source:
        check_sources(stores)
    scaling, table = scaled_table(cc, stores, probe=args.probe, batch_size=args.batch_size, progress=not args.quiet)
    if args.by_source:
        labels = add_source_columns(table, firing_by_source(cc, stores, batch_size=args.batch_size))
        print(f"firing split by source: {', '.join(labels)}")
    analysis.write_table(table, args.out)
    counts = {c: table["class"].count(c) for c in sorted(set(table["class"]))}
    print(f"{args.out}: {len(table['latent'])} latents scaled over {scaling.tokens} tokens; classes: {counts}")
    return 0
