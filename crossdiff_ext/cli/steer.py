"""`crossdiff steer`: generate from a prompt with and without crosscoder latents steered in (or ablated:
their decoder directions projected out)."""

import argparse

import torch

from ..data.store import ActivationStore
from ..diffing import steering
from ..diffing.latent_scaling import latent_scaling
from ..errors import InputError
from ..layer import CrossCoder
from .common import add_latents_argument, at_least, check_latent_ids, load_model, parse_latents


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register steer's flags."""
    p.add_argument("--checkpoint", required=True, help="a crosscoder: a directory or a Hub repo id")
    p.add_argument("--model", required=True, help="the model to steer (directory or hub name)")
    p.add_argument("--layer", type=at_least(0), required=True, help="the crosscoder's layer (block index)")
    add_latents_argument(p, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--scale", type=float, default=1.0, help="multiple of each latent's maximum activation")
    p.add_argument("--max-activation", type=float, default=None, help="default: measured over --store")
    p.add_argument("--store", default=None, help="activation store the maximum activations are measured on")
    p.add_argument("--mode", default="all_tokens", choices=list(steering.MODES))
    p.add_argument("--model-index", type=at_least(0), default=1, help="the decoder whose rows steer (default 1: chat)")
    p.add_argument("--ablate", action="store_true", help="project the latents' directions out instead")
    p.add_argument("--max-new-tokens", type=at_least(1), default=20)
    p.add_argument("--device", default=None)


def _one_set(values: list[str]) -> list[int]:
    """The latents to steer: --latents must give exactly one set."""
    sets = parse_latents(values)
    if len(sets) != 1:
        raise InputError(f"--latents: steer takes one set of latents, got {len(sets)} ({', '.join(sets)})")
    (ids,) = sets.values()
    if not ids:
        raise InputError("--latents: the set is empty")
    return ids


def run(args: argparse.Namespace) -> int:
    """Generate twice and print both continuations. Returns the exit status."""
    if not args.ablate and (args.max_activation is None) == (args.store is None):
        raise InputError("steering needs one of --max-activation or --store (the maximum activations), or --ablate")
    latents = _one_set(args.latents)
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    check_latent_ids({"latents": latents}, cc.dict_size)
    model, tokenizer = load_model(args.model, "--model")
    model = model.to(cc.W_enc.device).eval()
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(cc.W_enc.device)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        plain = model.generate(ids, **options)
        if args.ablate:
            edit = steering.ablate(model, cc, latents, layer=args.layer, model_index=args.model_index)
        else:
            amount = args.max_activation
            if amount is None:
                amount = latent_scaling(cc, ActivationStore(args.store), latents=latents)
            edit = steering.steer(
                model,
                cc,
                latents,
                layer=args.layer,
                scale=args.scale,
                model_index=args.model_index,
                mode=args.mode,
                max_activation=amount,
            )
        with edit:
            edited = model.generate(ids, **options)
    what = "ablated" if args.ablate else f"steered x{args.scale} ({args.mode})"
    print(f"plain:   {tokenizer.decode(plain[0, ids.shape[1] :])}")
    print(f"{what}: {tokenizer.decode(edited[0, ids.shape[1] :])}")
    return 0
