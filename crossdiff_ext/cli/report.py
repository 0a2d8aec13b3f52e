"""`crossdiff report`: Latent Scaling, the latent table and max-activating examples of a checkpoint -> an HTML
page, with the training curves of the run's log (the log.jsonl beside a step-N checkpoint, or --curves)."""

import argparse
import os
from typing import Any, Optional

from ..data.store import ActivationStore
from ..diffing.report import report_crosscoder
from ..errors import InputError
from ..layer import CrossCoder
from ..training.checkpoints import CHECKPOINT_PATTERN
from ..training.loggers import JSONL_NAME, read_log
from .common import add_scoring_arguments, at_least, check_fits, open_stores, output_file, read_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register report's flags."""
    add_scoring_arguments(p, "report.html")
    p.add_argument("--tokenizer", default=None, help="default: the store's chat model, when local")
    p.add_argument("--top", type=at_least(0), default=20, help="fine-tuned-specific latents listed")
    p.add_argument("--title", default="crossdiff_ext: which concepts did fine-tuning introduce?")
    p.add_argument("--causal", default=None, help="causal.json of `crossdiff causal`: KL chart, causal score")
    p.add_argument(
        "--by-source", action="store_true", help="split the listed latents' firing by the source of the stores' tokens"
    )
    p.add_argument(
        "--curves",
        default=None,
        metavar="LOG",
        help="the training log (JSONL) whose curves the report plots (default: the log.jsonl beside a step-N "
        "checkpoint, when there is one; none: no curves)",
    )


def _tokenizer(spec: Optional[str], store: ActivationStore) -> Any:
    """The tokenizer named by --tokenizer, else the store's chat model when it is a local directory, else None
    (the report then shows token ids)."""
    spec = spec or store.meta.get("info", {}).get("chat")
    if not spec or (spec.startswith((".", "/")) and not os.path.isdir(spec)):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        print(f"note: no tokenizer for {spec!r} ({err}); the report shows token ids")
        return None


def _causal_file(path: Optional[str]) -> Optional[dict]:
    """The result of `crossdiff causal` (None without --causal)."""
    if path is None:
        return None
    payload = read_json(path, "--causal")
    if not isinstance(payload, dict) or not isinstance(payload.get("kl"), dict):
        raise InputError(f"--causal {path}: not a result of `crossdiff causal` (no 'kl' entry)")
    return payload


def _curves(spec: Optional[str], checkpoint: str) -> tuple[Optional[list[dict]], Optional[str]]:
    """(records, path) of the training log to plot: --curves, else the run's log.jsonl beside a step-N
    checkpoint when it exists; (None, None) for --curves none or when there is no log."""
    if spec is not None and spec.lower() == "none":
        return None, None
    if spec is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), JSONL_NAME)
        if not (CHECKPOINT_PATTERN.match(os.path.basename(os.path.abspath(checkpoint))) and os.path.isfile(beside)):
            return None, None
        spec = beside
    try:
        return read_log(spec), spec
    except InputError as err:
        raise InputError(f"--curves: {err}") from err


def run(args: argparse.Namespace) -> int:
    """Write the report and print where. Returns the exit status."""
    output_file(args.out)
    curves, curves_path = _curves(args.curves, args.checkpoint)  # a bad log is named before weights load
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = open_stores(args.store)
    check_fits(cc, args.checkpoint, stores[0])
    _, _, table_path, chosen, _ = report_crosscoder(
        cc,
        stores,
        args.out,
        probe=args.probe,
        top=args.top,
        tokenizer=_tokenizer(args.tokenizer, stores[0]),
        title=args.title,
        meta=dict(checkpoint=args.checkpoint),
        batch_size=args.batch_size,
        progress=not args.quiet,
        causal=_causal_file(args.causal),
        by_source=args.by_source,
        curves=curves,
    )
    print(
        f"{args.out}: report on {cc.dict_size} latents ({len(chosen)} fine-tuned-specific listed); table {table_path}"
        + (f"; training curves of {curves_path}" if curves_path else "")
    )
    return 0
