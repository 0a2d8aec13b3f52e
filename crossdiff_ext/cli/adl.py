"""`crossdiff adl`: the Activation Difference Lens of a fine-tune (the mean activation difference on the first
positions of generic text, read by the fine-tuned model's logit lens, Patchscope and, with --steer-prompt,
coherent steering) -> a JSON file."""

import argparse

from .. import atomic
from ..diffing import activation_difference, lens
from .common import at_least, output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register adl's flags."""
    p.add_argument("--base", required=True, help="base model: directory or hub name")
    p.add_argument("--chat", required=True, help="fine-tuned model: directory or hub name (its tokenizer is used)")
    p.add_argument("--data", required=True, help="generic text: JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="adl.json")
    p.add_argument("--layer", type=at_least(0), default=None, help="the block read (default: the middle one)")
    p.add_argument("--positions", type=at_least(1), default=5, help="the first positions read per document")
    p.add_argument("--batch-size", type=at_least(1), default=32)
    p.add_argument("--top-k", type=at_least(1), default=20, help="tokens listed per readout")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(lens.PATCHSCOPE_SCALES),
        help="Patchscope's sweep, in multiples of the typical residual norm",
    )
    p.add_argument("--identity-prompt", default=lens.IDENTITY_PROMPT)
    p.add_argument("--placeholder", default=lens.PLACEHOLDER)
    p.add_argument("--control-word", default=lens.CONTROL_WORD)
    p.add_argument("--steer-prompt", action="append", default=None, help="a prompt to steer from (repeatable)")
    p.add_argument("--steer-factor", type=float, default=2.0, help="coherent: steered NLL <= this x unsteered NLL")
    p.add_argument("--steer-max-scale", type=float, default=8.0)
    p.add_argument("--steer-steps", type=at_least(0), default=6)
    p.add_argument("--steer-tokens", type=at_least(1), default=24)
    p.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    """Run the lens, write the JSON and print each position's top tokens. Returns the exit status."""
    output_file(args.out)
    result = activation_difference.adl(
        args.base,
        args.chat,
        args.data,
        layer=args.layer,
        n_positions=args.positions,
        batch_size=args.batch_size,
        top_k=args.top_k,
        patchscope_scales=args.scales,
        identity_prompt=args.identity_prompt,
        placeholder=args.placeholder,
        control_word=args.control_word,
        steering_prompts=args.steer_prompt,
        steering_factor=args.steer_factor,
        steering_max_scale=args.steer_max_scale,
        steering_steps=args.steer_steps,
        steering_tokens=args.steer_tokens,
        device=args.device,
    )
    atomic.write_json(args.out, result.to_json(), indent=1)
    for p, (read, scope) in enumerate(zip(result.logit_lens, result.patchscope)):
        top = " ".join(repr(t["token"]) for t in read["top"][:8])
        if scope is None:
            print(f"position {p}: logit lens {top}\n            patchscope: the models agree here (zero difference)")
            continue
        chosen = " ".join(repr(t["token"]) for t in scope.chosen_tokens[:8]) or "(no scale parses)"
        print(f"position {p}: logit lens {top}\n            patchscope x{scope.chosen_scale}: {chosen}")
    print(f"{args.out}: layer {result.layer}, {result.documents} documents")
    return 0
