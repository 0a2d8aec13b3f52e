"""The model card's facts of a training checkpoint: what the step directory and the run's JSONL log record about
how the crosscoder was trained (tokens seen, mu, the fraction of variance explained per model)."""

import json
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from ..errors import InputError
from ..layer import checkpoints, sharded
from ..layer.hub import CardFacts


def read_trainer_config(checkpoint: Union[os.PathLike, str]) -> Optional[dict[str, Any]]:
    """The TrainConfig (as a dict) and step a step directory was saved with, or None when it has no trainer state
    (a save_pretrained directory).

    Args:
        checkpoint: A step-NNNNNNNN directory of cx.train or distributed.train.

    Returns:
        {"step": int, "config": dict}, or None.
    """
    path = os.path.join(os.fspath(checkpoint), sharded.TRAINER_NAME)
    if not os.path.isfile(path):
        return None
    remedy = (
        "resume the run once with --trust-checkpoint (its later checkpoints are plain), or push a save_pretrained "
        "copy of the crosscoder (its card then lacks the run's facts)"
    )
    state = checkpoints.torch_load_safely(path, "a checkpoint's training state", remedy=remedy)
    if not isinstance(state, dict) or "step" not in state or not isinstance(state.get("config"), dict):
        raise InputError(f"{path}: not a trainer state (expected a dict with step and config)")
    return dict(step=int(state["step"]), config=state["config"])


def last_logged(log_path: Union[os.PathLike, str], step: int) -> Optional[dict[str, Any]]:
    """The last record of a JSONL training log at or before `step` that has fve_per_model, or None.

    Args:
        log_path: The run's log.jsonl (absent: None).
        step: The checkpoint's step (a log continues past it when the run went on).

    Returns:
        The record, or None.
    """
    if not os.path.isfile(log_path):
        return None
    found = None
    with open(log_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # a line torn by a kill mid-write: the records before it still count
                continue
            if isinstance(record, dict) and record.get("step", step + 1) <= step and "fve_per_model" in record:
                found = record
    return found


def card_facts(
    checkpoint: Union[os.PathLike, str],
    *,
    base_model: Optional[str] = None,
    chat_model: Optional[str] = None,
    layer: Optional[int] = None,
    datasets: Optional[Sequence[str]] = None,
) -> CardFacts:
    """The model card's facts for a training checkpoint: what it records, plus what the caller knows.

    Tokens trained are step x batch_size (rows of the global batch); mu is the run's l1_coefficient; the FVE per
    model is the last logged training batch's at or before the checkpoint's step (from the run's log_path, or
    log.jsonl beside the step directory). What is not recorded stays None ("not recorded" on the card).

    Args:
        checkpoint: A step directory (or a save_pretrained directory: then only the given facts).
        base_model: The base model's name or repo id.
        chat_model: The chat (fine-tuned) model's name or repo id.
        layer: The layer the crosscoder reads.
        datasets: The training data sets.

    Returns:
        The CardFacts.
    """
    facts = CardFacts(base_model=base_model, chat_model=chat_model, layer=layer, datasets=datasets)
    trainer = read_trainer_config(checkpoint)
    if trainer is None:
        return facts
    config, step = trainer["config"], trainer["step"]
    facts.tokens_trained = step * int(config["batch_size"])
    facts.l1_coefficient = config.get("l1_coefficient")
    run_dir = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
    record = last_logged(config.get("log_path") or os.path.join(run_dir, "log.jsonl"), step)
    if record is not None:
        facts.fve_per_model = [float(v) for v in record["fve_per_model"]]
        facts.fve_note = f"training batch at step {record['step']}"
    return facts
