"""Crosscoders on the Hugging Face Hub: a repo id resolved to local files, and a crosscoder pushed with a model card.

huggingface_hub is an optional extra (`pip install 'crossdiff_ext[hub]'`), imported only when a repo id is used.
Downloads go through its cache, so HF_HUB_OFFLINE=1, HF_HOME / HF_HUB_CACHE and HF_TOKEN work as with every other
Hub library. Only the files a loader can read are fetched (JSON configs, safetensors, torch files); nothing
fetched is executed: the loaders read safetensors, or torch files with torch.load(weights_only=True).
"""

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .. import atomic
from ..errors import InputError, MissingInputError
from . import checkpoints

# owner/name as the Hub spells it; a local path that does not exist but looks like this is tried on the Hub.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
LOADABLE_PATTERNS = ("*.json", "*.safetensors", "*.pt", "*.pth", "*.bin")
CARD_NAME = "README.md"
LIBRARY_NAME = "crossdiff_ext"


def _hub():
    """The huggingface_hub module, or one InputError line saying which extra to install."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise InputError("a Hugging Face Hub repo id needs huggingface_hub: pip install 'crossdiff_ext[hub]'") from e
    return huggingface_hub


def is_repo_id(name: Union[os.PathLike, str]) -> bool:
    """Whether `name` reads as a Hub repo id (owner/name) rather than as a local path that exists.

    Args:
        name: A local path or a repo id.

    Returns:
        True when no file or directory of that name exists here and it has the owner/name form.
    """
    name = os.fspath(name)
    return not os.path.exists(name) and REPO_ID.fullmatch(name) is not None


def resolve(
    name_or_path: Union[os.PathLike, str],
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    cache_dir: Optional[Union[os.PathLike, str]] = None,
    token: Optional[Union[str, bool]] = None,
) -> str:
    """A local path for a checkpoint named by a local path or a Hub repo id.

    Args:
        name_or_path: A file or directory here, or a repo id (owner/name) on the Hub.
        revision: A branch, tag or commit of the repo (default: main); only for a repo id.
        subfolder: A folder inside the directory or repo that holds the checkpoint.
        cache_dir: The Hub cache to use (default: huggingface_hub's, HF_HUB_CACHE).
        token: A Hub token (default: huggingface_hub's, e.g. HF_TOKEN or a saved login).

    Returns:
        The local path: name_or_path[/subfolder] as given for a local path; for a repo id, the folder of its
        snapshot in the cache (downloaded unless HF_HUB_OFFLINE=1), with the subfolder joined.

    Raises:
        InputError: revision was given for a local path; the repo, revision or subfolder is not on the Hub (or,
            offline, not in the cache); huggingface_hub is not installed.
    """
    path = os.fspath(name_or_path)
    subfolder = (subfolder or "").strip("/")
    if not is_repo_id(path):
        if revision is not None:
            raise InputError(f"revision={revision!r} applies to a Hub repo id, but {path!r} is a local path")
        return os.path.join(path, subfolder) if subfolder else path
    hub = _hub()
    patterns = [f"{subfolder}/{p}" if subfolder else p for p in LOADABLE_PATTERNS]
    try:
        snapshot = hub.snapshot_download(
            path,
            revision=revision,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            token=token,
            allow_patterns=patterns,
            library_name=LIBRARY_NAME,
        )
    except (OSError, ValueError, hub.errors.EntryNotFoundError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise InputError(f"{path}: no such local path, and the Hub repo{at} cannot be read ({_one_line(e)})") from e
    local = os.path.join(snapshot, subfolder) if subfolder else snapshot
    if not os.path.isdir(local):
        raise MissingInputError(f"{path}: the Hub repo has no subfolder {subfolder!r}")
    return local


def _one_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (Hub errors add request ids and hints below it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@dataclass
class CardFacts:
    """What a model card says beyond the crosscoder's own config; None where it was not recorded.

    Attributes:
        base_model: The base model's name or repo id (model index 0).
        chat_model: The fine-tuned (chat) model's name or repo id (model index 1).
        layer: The layer whose residual stream the crosscoder reads.
        tokens_trained: Activation rows (tokens) seen in training.
        fve_per_model: Fraction of variance explained per model, in model order.
        l1_coefficient: The L1 sparsity coefficient mu of an L1 (ReLU) crosscoder.
        datasets: The training data sets (names or repo ids).
        fve_note: Where the FVE was measured (e.g. "training batch at step 1000"), shown beside it.
    """

    base_model: Optional[str] = None
    chat_model: Optional[str] = None
    layer: Optional[int] = None
    tokens_trained: Optional[int] = None
    fve_per_model: Optional[Sequence[float]] = None
    l1_coefficient: Optional[float] = None
    datasets: Optional[Sequence[str]] = None
    fve_note: Optional[str] = None


def _yaml_list(key: str, values: Sequence[str]) -> list[str]:
    # JSON strings are YAML strings: a name with a colon or a quote stays one value.
    return [f"{key}:"] + [f"- {json.dumps(str(v))}" for v in values] if values else []


def model_card(
    model: torch.nn.Module, repo_id: str, facts: Optional[CardFacts] = None, subfolder: Optional[str] = None
) -> str:
    """The README.md (model card) pushed with a crosscoder.

    Args:
        model: The crosscoder (a CrossCoder: its config() gives the dimensions, activation and k).
        repo_id: The repo it is pushed to (for the loading snippet).
        facts: The training facts the crosscoder does not hold itself.
        subfolder: The folder of the repo it is pushed into (for the loading snippet).

    Returns:
        Markdown with YAML front matter (library_name, tags, base_model, datasets).
    """
    facts = facts or CardFacts()
    config = model.config()
    models = [m for m in (facts.base_model, facts.chat_model) if m]
    front = ["---", f"library_name: {LIBRARY_NAME}", "tags:", "- crosscoder", "- model-diffing", "- sparse-dictionary"]
    front += _yaml_list("base_model", models) + _yaml_list("datasets", list(facts.datasets or ())) + ["---"]
    sparsity = (
        f"BatchTopK, k = {config['k']} active latents per token on average"
        if config["activation"] == "batch_topk"
        else f"L1 (ReLU), mu = {_known(facts.l1_coefficient)}"
    )
    fve = (
        ", ".join(f"{name}: {value:.4f}" for name, value in zip(_model_names(facts, config), facts.fve_per_model))
        if facts.fve_per_model is not None
        else "not recorded"
    )
    if facts.fve_per_model is not None and facts.fve_note:
        fve += f" ({facts.fve_note})"
    rows = [
        ("models", " / ".join(_model_names(facts, config))),
        ("layer", _known(facts.layer)),
        ("activation width d", config["d_model"]),
        ("dictionary size", config["dict_size"]),
        ("sparsity", sparsity),
        ("tokens trained", _known(facts.tokens_trained)),
        ("fraction of variance explained", fve),
        ("input normalisation", "none" if config.get("target_rms") is None else f"target_rms = {config['target_rms']}"),
    ]
    table = ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows]
    body = [
        f"# Crosscoder: {' vs '.join(_model_names(facts, config))}",
        "",
        f"A crosscoder for model diffing, written by {LIBRARY_NAME} in its own safetensors format "
        "(model.safetensors + config.json).",
        "",
        *table,
        "",
        "## Load it",
        "",
        "```python",
        "import crossdiff_ext as cx",
        "",
        f"crosscoder = cx.CrossCoder.from_pretrained({_load_arguments(repo_id, subfolder)})",
        "```",
        "",
        "Loading reads only safetensors and JSON; no code from the repo runs.",
    ]
    return "\n".join(front + [""] + body) + "\n"


def _model_names(facts, config):
    names = [facts.base_model or "base model", facts.chat_model or "chat model"]
    return names + [f"model {i}" for i in range(2, config["n_models"])]


def _load_arguments(repo_id, subfolder):
    subfolder = (subfolder or "").strip("/")
    return json.dumps(repo_id) + (f", subfolder={json.dumps(subfolder)}" if subfolder else "")


def _known(value: Any) -> str:
    return "not recorded" if value is None else str(value)


def push_to_hub(
    model: torch.nn.Module,
    repo_id: str,
    *,
    facts: Optional[CardFacts] = None,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
) -> str:
    """Upload a crosscoder in our format (model.safetensors + config.json) with a generated model card.

    Args:
        model: The crosscoder to upload.
        repo_id: The target repo (owner/name); created (as a model repo) when it does not exist.
        facts: What the card says beyond the crosscoder's config (models, layer, tokens, FVE, mu).
        subfolder: A folder in the repo to upload into (e.g. one per layer); the card goes there too.
        revision: The branch to commit to (default: main).
        private: Visibility of a repo created here (default: the Hub's).
        token: A Hub token (default: huggingface_hub's, e.g. HF_TOKEN).
        commit_message: The commit message (default: "Upload crosscoder").
        create_pr: Open a pull request instead of committing to the branch.

    Returns:
        The commit's URL (or the pull request's when create_pr).

    Raises:
        InputError: repo_id is not owner/name, or huggingface_hub is not installed.
    """
    if not isinstance(repo_id, str) or REPO_ID.fullmatch(repo_id) is None:
        raise InputError(f"repo_id must be a Hub repo id owner/name, got {repo_id!r}")
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crossdiff-push-") as folder:
        checkpoints.save_pretrained(model, folder)
        atomic.write_text(os.path.join(folder, CARD_NAME), model_card(model, repo_id, facts, subfolder))
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=(subfolder or "").strip("/") or None,
            revision=revision,
            commit_message=commit_message or "Upload crosscoder",
            create_pr=create_pr,
        )
    return str(getattr(info, "pr_url", None) or getattr(info, "commit_url", info))
