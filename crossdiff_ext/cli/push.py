"""`crossdiff push`: upload a crosscoder to the Hugging Face Hub in our format with a generated model card; a
training checkpoint's card also gives the tokens trained, mu and the logged FVE per model."""

import argparse

from ..layer import CrossCoder
from ..training.card import card_facts
from .common import at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register push's arguments."""
    p.add_argument("checkpoint", help="a crosscoder directory (save_pretrained / a step-N dir of a training run)")
    p.add_argument("repo_id", help="the Hub repo to upload to (owner/name; created when missing)")
    p.add_argument("--subfolder", default=None, help="a folder in the repo (e.g. one per layer)")
    p.add_argument("--revision", default=None, help="the branch to commit to (default: main)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--message", default=None, help="the commit message")
    p.add_argument("--base-model", default=None, help="the base model's name or repo id, for the card")
    p.add_argument("--chat-model", default=None, help="the chat (fine-tuned) model's name or repo id, for the card")
    p.add_argument("--layer", type=at_least(0), default=None, help="the layer the crosscoder reads, for the card")
    p.add_argument("--dataset", action="append", default=None, help="a training data set, for the card (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint (a local path), build its card's facts, upload, print the commit URL.

    Returns:
        0.
    """
    cc = CrossCoder.from_pretrained(args.checkpoint)
    facts = card_facts(
        args.checkpoint,
        base_model=args.base_model,
        chat_model=args.chat_model,
        layer=args.layer,
        datasets=args.dataset,
    )
    url = cc.push_to_hub(
        args.repo_id,
        facts=facts,
        subfolder=args.subfolder,
        revision=args.revision,
        private=True if args.private else None,
        commit_message=args.message,
        create_pr=args.create_pr,
    )
    print(f"{args.checkpoint} -> {args.repo_id}: {url}")
    return 0
