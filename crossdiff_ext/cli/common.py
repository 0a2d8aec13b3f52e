"""What several subcommands share: argparse types, output checks, stores and checkpoints that must fit, JSON
inputs, the one meaning of --latents, and loading a model named on the command line."""

import argparse
import json
import os
from typing import Any, Callable, Optional, Sequence

from ..data.store import ActivationStore
from ..errors import InputError, MissingInputError
from ..layer import CrossCoder

LATENTS_HELP = (
    "latent ids (e.g. 3 17 42), or a JSON file: a list of ids, an object {set name: [ids]}, or an earlier "
    "causal.json (its latent_sets); ids and files may be mixed, the ids given directly form the set 'latents'"
)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low.

    Args:
        low: The smallest value allowed.

    Returns:
        The parser of one command-line value.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def output_dir(path: Optional[str], flag: str = "--out") -> None:
    """Check, before any work, that an output directory is a directory or does not exist yet.

    Raises:
        InputError: path is a file.
    """
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a file, not a directory")


def output_file(path: str, flag: str = "--out") -> None:
    """Check, before any work, that an output file goes into an existing directory.

    Raises:
        InputError: The parent directory is missing, or path is a directory.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path!r}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a directory, not a file")


def open_stores(paths: Sequence[str]) -> list[ActivationStore]:
    """The --store arguments, opened (sizes checked) and checked to hold rows of one shape.

    Raises:
        InputError: A store is missing or corrupt, or the stores' row shapes differ.
    """
    stores = [ActivationStore(path) for path in paths]
    if len({(s.n_models, s.d_model) for s in stores}) != 1:
        raise InputError(
            "the stores' shapes differ: " + ", ".join(f"{s.path}: [M={s.n_models}, d={s.d_model}]" for s in stores)
        )
    return stores


def check_fits(cc: CrossCoder, checkpoint: str, store: ActivationStore) -> None:
    """Check that a crosscoder reads rows of the store's shape and (BatchTopK) has the inference threshold that
    scaling and reports need.

    Raises:
        InputError: It does not.
    """
    if (cc.n_models, cc.d_model) != (store.n_models, store.d_model):
        raise InputError(
            f"the checkpoint {checkpoint} reads [M={cc.n_models}, d={cc.d_model}] rows, the store {store.path} "
            f"holds [M={store.n_models}, d={store.d_model}]"
        )
    if cc.activation == "batch_topk" and float(cc.threshold) < 0:
        raise InputError(
            f"the checkpoint {checkpoint} has no inference threshold (-1: it stopped before threshold_start_step = "
            f"{cc.threshold_start_step}); scaling and reports read the inference-mode codes: train it longer"
        )


def read_json(path: str, flag: str) -> Any:
    """The JSON file a flag names.

    Raises:
        MissingInputError: The file does not exist.
        InputError: It is not JSON.
    """
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MissingInputError(f"{flag} {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{flag} {path}: not JSON ({err})") from None


def _ids(values: Any, where: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"--latents {where}: expected a list of latent ids, got {values!r}"[:300])
    if any(v < 0 for v in values):
        raise InputError(f"--latents {where}: latent ids must be >= 0, got {values}")
    return values


def _latent_sets_in(path: str) -> dict[str, list[int]]:
    payload = read_json(path, "--latents")
    if isinstance(payload, list):
        return {os.path.splitext(os.path.basename(path))[0]: _ids(payload, path)}
    sets = payload.get("latent_sets", payload) if isinstance(payload, dict) else None
    if not isinstance(sets, dict) or not sets:
        raise InputError(f"--latents {path}: expected a list of latent ids or an object of set name -> ids")
    return {name: _ids(ids, f"{path} set {name!r}") for name, ids in sets.items()}


def parse_latents(values: Sequence[str]) -> dict[str, list[int]]:
    """The one reading of --latents, for every subcommand that takes it (see LATENTS_HELP).

    Args:
        values: The words given after --latents: latent ids and JSON file paths.

    Returns:
        {set name: latent ids}, the directly given ids under 'latents', then each file's sets in order.

    Raises:
        InputError: A word is neither an id nor an existing file, a file is not a set of ids, or a set name
            repeats.
        MissingInputError: A file does not exist.
    """
    sets: dict[str, list[int]] = {}
    direct = []
    for word in values:
        if word.lstrip("-").isdigit():
            direct += _ids([int(word)], word)
            continue
        if not os.path.exists(word) and not word.endswith(".json"):
            raise InputError(f"--latents {word!r} is neither a latent id nor a JSON file")
        for name, ids in _latent_sets_in(word).items():
            if name in sets or (name == "latents" and direct):
                raise InputError(f"--latents: the set {name!r} is given twice")
            sets[name] = ids
    return {"latents": direct, **sets} if direct else sets


def load_model(path: str, flag: str) -> tuple[Any, Any]:
    """A transformers causal LM and its tokenizer, from a directory or hub name given on the command line.

    Raises:
        MissingInputError: path looks like a local path and does not exist.
        InputError: transformers cannot load a model or tokenizer from it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise MissingInputError(f"{flag} {path!r}: the model directory does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # transformers' errors for a path or name without a model in it
        raise InputError(f"{flag} {path!r}: the model cannot be loaded: {err}") from err


def add_scoring_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    """The flags of the subcommands that score a checkpoint on stores (scale, report)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a crosscoder: a directory (save_pretrained / a step-N dir) or a Hub repo id",
    )
    p.add_argument("--store", required=True, action="append", help="activation store(s) to score on")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--probe", default="chat", choices=["chat", "base"])
    p.add_argument("--batch-size", type=at_least(1), default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")


def add_latents_argument(p: argparse.ArgumentParser, required: bool) -> None:
    """--latents, read the same way by every subcommand (parse_latents)."""
    p.add_argument("--latents", nargs="+", default=None, required=required, metavar="ID_OR_FILE", help=LATENTS_HELP)


def check_latent_ids(sets: dict[str, list[int]], dict_size: int) -> None:
    """Check that every id names one of the crosscoder's latents.

    Raises:
        InputError: An id is >= dict_size.
    """
    for name, ids in sets.items():
        outside = [i for i in ids if i >= dict_size]
        if outside:
            raise InputError(f"--latents: set {name!r} holds ids {outside[:8]} outside [0, dict_size = {dict_size})")
