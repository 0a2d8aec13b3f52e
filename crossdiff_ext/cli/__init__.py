"""The `crossdiff` command line: one module per subcommand, each with `add_arguments(parser)` and `run(args)`.

crossdiff collect --base B --chat C --layer L --data FILE --out STORE   paired activations -> activation store
crossdiff train --store STORE --out RUN --dict-size F -k K              train a crosscoder on a store
torchrun --nproc-per-node 8 -m crossdiff_ext train ... --latent-parallel 4   the same on a 2 x 4 mesh
crossdiff scale --checkpoint RUN/step-N --store STORE --out latents.csv  Latent Scaling + the latent table
crossdiff report --checkpoint RUN/step-N --store STORE --out report.html the HTML report (and the table)
crossdiff causal --checkpoint CC --base B --chat C --layer L --data FILE --store STORE --out causal.json
                 the activation-patching KL experiment on the paper's latent sets (or --latents)
crossdiff steer --checkpoint CC --model M --layer L --latents IDS ... --prompt TEXT   generate with and without
                 the latents steered in (or --ablate: projected out)
crossdiff adl --base B --chat C --data FILE --out adl.json   the Activation Difference Lens of a fine-tune
crossdiff logit-diff --base B --chat C --data FILE --out diff.json   where the two models' outputs disagree
crossdiff miniature --out DIR   the paper's finding in miniature: L1 vs BatchTopK on a planted dictionary
crossdiff demo    the main job on its embedded default: a tiny base/chat transformers pair, paired activations,
                  BatchTopK and L1 crosscoders, Latent Scaling, tables and HTML reports
crossdiff planted train on a planted dictionary and check the decoder-norm bands against the planted truth
crossdiff organism --model M --kind K --strength S --out ROOT   a model organism: a narrow fine-tune with a known
                 implanted behaviour and its truth.json (--show DIR prints an organism's truth)
crossdiff push RUN/step-N OWNER/NAME --base-model B --chat-model C --layer L   upload a crosscoder to the Hub with
                 a generated model card (tokens trained, mu and the logged FVE per model from the run)
crossdiff verify STORE ...   recompute the checksum of every shard of activation stores; name the bad ones

Errors. A user's error (a missing or corrupt input, a setting out of range, inputs that do not fit together) is
an errors.InputError (or a subclass), raised where it is found, by the library or by a subcommand's checks.
main() catches it once for every subcommand and prints one line, `crossdiff <command>: error: <message>`, to
stderr with exit status 2 (argparse's own errors print the same one line). Any other exception is a bug: it keeps
its traceback and exits 1.
"""

import argparse
import sys
from typing import Optional, Sequence

from ..errors import InputError
from . import (
    adl,
    causal,
    collect,
    demo,
    logit_diff,
    miniature,
    organism,
    planted,
    push,
    report,
    scale,
    steer,
    train,
    verify,
)

# (name, module, one-line help), in the order --help lists them.
SUBCOMMANDS = (
    ("demo", demo, "the whole diffing job on a tiny base/chat pair (or real models)"),
    ("planted", planted, "train on a planted dictionary and check what the diffing metric finds"),
    ("miniature", miniature, "L1 vs BatchTopK on a planted dictionary: the paper's finding in miniature"),
    ("verify", verify, "recompute the checksums of every shard of activation stores"),
    ("collect", collect, "paired activations of a base and a fine-tuned model -> activation store"),
    ("train", train, "train a crosscoder on an activation store, or online on two models"),
    ("scale", scale, "Latent Scaling of every latent -> the latent table (CSV / Parquet)"),
    ("report", report, "Latent Scaling, latent table and max-activating examples -> HTML"),
    ("causal", causal, "activation-patching KL experiment: do the latents move the chat model?"),
    ("steer", steer, "generate with and without crosscoder latents steered in (or ablated)"),
    ("adl", adl, "Activation Difference Lens: the mean activation difference read by the fine-tuned model"),
    ("logit-diff", logit_diff, "output differences: KL per position and the tokens the fine-tune promotes"),
    ("organism", organism, "a narrow fine-tune with a known implanted behaviour and its truth (a model organism)"),
    ("push", push, "upload a crosscoder to the Hugging Face Hub with a generated model card"),
)


class Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format (usage stays in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `<prog>: error: <message>` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `crossdiff` parser with every subcommand registered.

    Returns:
        The parser; a parsed namespace's `run` is the subcommand's run function.
    """
    parser = Parser(prog="crossdiff", description="Model diffing with crosscoders.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, module, what in SUBCOMMANDS:
        p = sub.add_parser(name, help=what, description=" ".join((module.__doc__ or what).split()))
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `crossdiff` command: parse `argv` (default sys.argv[1:]) and run the subcommand.

    Args:
        argv: The arguments after the program name (None: sys.argv[1:]).

    Returns:
        The exit status: 0 on success, 2 after a user's error (bad arguments, a missing or corrupt input: one
        line on stderr), or the subcommand's own status (planted: 1 when a concept was missed).

    Raises:
        SystemExit: argparse's exit (status 2) for arguments it cannot parse, and --help's (status 0).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as err:
        message = " ".join(str(err).split())  # one line, whatever the library's message holds
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2
