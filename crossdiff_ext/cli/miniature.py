"""`crossdiff miniature`: L1 vs BatchTopK on a planted dictionary, the paper's finding in miniature
(demo/miniature.py): Delta_norm's chat-only latents against the truth, the L1 artifacts (Complete Shrinkage,
Latent Decoupling) and Latent Scaling's verdicts."""

import argparse

from ..demo import miniature as mini
from .common import at_least, output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the miniature's flags."""
    p.add_argument("--out", default="miniature")
    p.add_argument("--steps", type=at_least(1), default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (both crosscoders)")
    p.add_argument("--l1-coefficient", type=float, default=0.15, help="mu of the L1 crosscoder")
    p.add_argument(
        "--l1-reconstruction",
        default="squared",
        choices=["squared", "l2"],
        help="the L1 crosscoder's reconstruction loss (squared, as in the paper's L1 runs; BatchTopK trains on l2)",
    )
    p.add_argument(
        "--init", default="independent", choices=["independent", "shared"], help="the crosscoders' init (both)"
    )
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the miniature and print its results. Returns the exit status."""
    output_dir(args.out)
    summary = mini.run(
        args.out,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        l1_coefficient=args.l1_coefficient,
        l1_reconstruction=args.l1_reconstruction,
        init=args.init,
        progress=not args.quiet,
    )
    for r in summary["results"]:
        art = r["artifacts"]
        print(
            f"{r['model']:>9}: FVE {r['fve']:.3f}, L0 {r['l0']}; Delta_norm > 0.9: {r['chat_only_by_delta_norm']} "
            f"latents, {r['of_which_not_chat_only']} of them not a planted chat-only concept "
            f"{r['false_chat_only_kinds']}; artifacts: {art['complete_shrinkage']} Complete Shrinkage, "
            f"{art['latent_decoupling']} Latent Decoupling, flagged by Latent Scaling: {r['artifacts_flagged']}; "
            f"true chat-only concepts kept: {r['true_chat_only_kept']}; Latent Scaling on the false ones: "
            f"{r['latent_scaling_verdicts_on_false']}"
        )
    print(f"{summary['seconds']} s; {args.out}/summary.json, {args.out}/miniature.png")
    return 0
