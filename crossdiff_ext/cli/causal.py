"""`crossdiff causal`: the activation-patching KL experiment (diffing/causal.py) on the paper's latent sets from
Latent Scaling, or on given --latents -> a JSON file."""

import argparse

import torch

from .. import atomic
from ..data.store import ActivationStore
from ..diffing import causal
from ..diffing.latent_scaling import latent_scaling
from ..errors import InputError
from ..layer import CrossCoder
from .common import add_latents_argument, at_least, check_latent_ids, output_file, parse_latents


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register causal's flags."""
    p.add_argument("--checkpoint", required=True, help="a two-model crosscoder: a directory or a Hub repo id")
    p.add_argument("--base", required=True, help="base model directory or hub name")
    p.add_argument("--chat", required=True, help="chat model directory or hub name")
    p.add_argument("--layer", type=at_least(0), required=True, help="the crosscoder's layer (block index)")
    p.add_argument("--data", required=True, help="JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--store", default=None, help="an activation store: the paper's latent sets from Latent Scaling")
    add_latents_argument(p, required=False)
    p.add_argument("--out", required=True, help="causal.json")
    p.add_argument("--variant", default="replace", choices=list(causal.VARIANTS))
    p.add_argument("--first-k", type=at_least(1), default=10)
    p.add_argument("--ignore-first", type=at_least(0), default=1)
    p.add_argument("--min-delta-norm", type=float, default=0.6)
    p.add_argument("--max-latents", type=at_least(1), default=3176, help="at most this many chat-leaning latents")
    p.add_argument("--attribution", action="store_true", help="also the first-order causal score of every latent")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--context-length", type=at_least(1), default=1024)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Patch, write the JSON result and print the KL tables. Returns the exit status."""
    if (args.store is None) == (args.latents is None):
        raise InputError("give either --store (the paper's latent sets, from Latent Scaling) or --latents")
    output_file(args.out)
    given = parse_latents(args.latents) if args.latents else None
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    if given is None:
        scaling = latent_scaling(cc, ActivationStore(args.store), progress=not args.quiet)
        sets = causal.paper_latent_sets(cc, scaling, min_delta_norm=args.min_delta_norm, n=args.max_latents)
    else:
        check_latent_ids(given, cc.dict_size)
        sets = {name: torch.tensor(ids, dtype=torch.int64) for name, ids in given.items()}
    options = dict(
        first_k=args.first_k,
        ignore_first=args.ignore_first,
        batch_size=args.batch_size,
        device=args.device,
        context_length=args.context_length,
    )
    result = causal.patch_kl(
        args.base, args.chat, cc, args.layer, args.data, sets, variant=args.variant, progress=not args.quiet, **options
    )
    payload = dict(result.to_json(), checkpoint=args.checkpoint, latent_sets={k: v.tolist() for k, v in sets.items()})
    if args.attribution:
        options.pop("first_k")
        payload["attribution"] = causal.attribution(
            args.base, args.chat, cc, args.layer, args.data, variant=args.variant, **options
        ).tolist()
    atomic.write_json(args.out, payload, indent=1)
    for subset in next(iter(result.kl.values())).keys():
        print(f"positions: {subset}\n{result.table(subset)}")
    print(f"{args.out}: KL(P_chat || P_patched) of {len(result.kl)} sets over {result.documents} documents")
    return 0
