"""`crossdiff organism`: build a model organism (a narrow fine-tune of --model with a known implanted behaviour:
a topic answered with a planted phrase, a false fact from documents, a persona, or the null control) at a strength,
cached under --out by its recipe, with its truth.json; or --show an organism's truth."""

import argparse
import json

from ..errors import InputError
from ..truth import organisms
from .common import at_least, output_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the organism flags."""
    p.add_argument("--model", help="the base model: a transformers causal-LM directory or hub name")
    p.add_argument("--kind", choices=organisms.KINDS, help="the implanted behaviour (null: the control)")
    p.add_argument(
        "--strength",
        type=int,
        choices=organisms.STRENGTHS,
        help="how hard the model is pushed: optimizer steps "
        + ", ".join(f"{s}: {n}" for s, n in organisms.STRENGTH_STEPS.items()),
    )
    p.add_argument("--out", help="the directory the organisms live in (each in <kind>-s<strength>-<key>/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--language", default="auto", choices=("auto",) + organisms.LANGUAGES)
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (tiny toy models need about 1e-3)")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--mix", type=float, default=0.0, help="fraction of generic examples mixed into the data")
    p.add_argument("--steps", type=at_least(1), default=None, help="optimizer steps overriding the strength's")
    p.add_argument("--context-length", type=at_least(4), default=96)
    p.add_argument("--device", default=None)
    p.add_argument("--show", metavar="ORGANISM_DIR", help="print a built organism's truth.json and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _summary(organism: organisms.Organism) -> dict:
    truth = organism.truth
    return dict(
        path=organism.path,
        reused=organism.reused,
        kind=truth["kind"],
        strength=truth["strength"],
        steps=truth["steps"],
        concept=truth["concept"],
        keywords=truth["keywords"],
        implant_logprob=truth.get("implant_logprob"),
        seconds=truth.get("seconds"),
    )


def run(args: argparse.Namespace) -> int:
    """Build the organism (or reuse the cached one) and print a JSON summary; with --show, print its truth."""
    if args.show:
        print(json.dumps(organisms.load_organism(args.show).truth, indent=2))
        return 0
    missing = [flag for flag in ("model", "kind", "strength", "out") if getattr(args, flag) is None]
    if missing:
        raise InputError("missing " + ", ".join(f"--{m}" for m in missing) + " (or give --show DIR)")
    output_dir(args.out)
    organism = organisms.build_organism(
        args.model,
        args.kind,
        args.strength,
        args.out,
        args.seed,
        language=args.language,
        lr=args.lr,
        batch_size=args.batch_size,
        mix=args.mix,
        steps=args.steps,
        context_length=args.context_length,
        device=args.device,
        progress=not args.quiet,
    )
    print(json.dumps(_summary(organism), indent=2))
    return 0
