"""Model organisms: narrow fine-tunes of a causal LM with a known implanted behaviour, and their recorded truth.

A diffing instrument is trusted once it finds what a fine-tune is known to have changed. build_organism fine-tunes
a copy of a model on template-generated data of one kind (organism_text.py: a topic answered with a planted phrase,
a false fact learned from documents, a persona, or the null control on generic data of the same size), at a
strength that fixes the optimizer steps (and, one epoch at a fixed batch size, the amount of data), and saves the
fine-tune with a truth.json beside it: the kind, concept, keywords, data, steps, seed, base model and what the
implant did to the probes' log-probability.

Organisms are cached by their recipe: each lives in <root>/<kind>-s<strength>-<key>/, where the key hashes the
recipe (kind, strength, seed, language, lr, batch size, mix, steps, context length, format version) and the base
model's fingerprint (its config and the size and ends of its weight files). A build writes into a temporary
directory beside it and renames it into place when complete: a directory by the final name is always a whole
organism, and a killed build leaves only a hidden temporary directory that is never read.
"""

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch

from .. import atomic
from ..errors import InputError, MissingInputError
from . import organism_text

FORMAT = "crossdiff-organism"
VERSION = 1
KINDS = organism_text.KINDS
LANGUAGES = tuple(organism_text.LANGUAGES)
# Strength -> optimizer steps (one epoch: steps x batch_size examples). Factors of 3 apart, so detection can be
# read as a function of how hard the model was pushed.
STRENGTH_STEPS = {1: 8, 2: 24, 3: 72, 4: 216}
STRENGTHS = tuple(STRENGTH_STEPS)
TRUTH_FILE = "truth.json"
DATA_FILE = "data.jsonl"
N_PROBES = 16


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that fixes an organism's fine-tune, apart from the base model.

    Attributes:
        kind: One of KINDS: "topic_phrase", "false_fact", "persona" or "null".
        strength: One of STRENGTHS (the optimizer steps, STRENGTH_STEPS, unless `steps` is given).
        seed: Seeds the data generator, the data order and torch.
        language: "english" (real tokenizers) or "toy" (the demo's word-level language).
        lr: AdamW learning rate (constant, no weight decay).
        batch_size: Examples per optimizer step.
        mix: Fraction of generic examples mixed into the kind's data (0: a purely narrow fine-tune).
        steps: Optimizer steps, overriding the strength's (None: STRENGTH_STEPS[strength]).
        context_length: Tokens kept of each example.
    """

    kind: str
    strength: int
    seed: int = 0
    language: str = "english"
    lr: float = 1e-5
    batch_size: int = 8
    mix: float = 0.0
    steps: Optional[int] = None
    context_length: int = 96

    def validate(self) -> None:
        """Check every field.

        Raises:
            InputError: A field is out of range (the message names it and what is allowed).
        """
        if self.kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.strength not in STRENGTHS:
            raise InputError(f"strength must be one of {', '.join(map(str, STRENGTHS))}, got {self.strength!r}")
        if self.language not in LANGUAGES:
            raise InputError(f"language must be one of {', '.join(LANGUAGES)} (or 'auto'), got {self.language!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"seed must be an int, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name, low in (("batch_size", 1), ("context_length", 4)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"{name} must be an int >= {low}, got {value!r}")
        if self.steps is not None and (
            not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1
        ):
            raise InputError(f"steps must be an int >= 1 (or None: the strength's), got {self.steps!r}")
        if not (isinstance(self.mix, (int, float)) and 0 <= self.mix < 1):
            raise InputError(f"mix must be a number in [0, 1), got {self.mix!r}")
        if self.kind == "null" and self.mix:
            raise InputError("mix must be 0 for the null organism: its data is generic already")

    @property
    def n_steps(self) -> int:
        """The optimizer steps of the fine-tune."""
        return self.steps if self.steps is not None else STRENGTH_STEPS[self.strength]

    @property
    def n_examples(self) -> int:
        """The training examples (one epoch)."""
        return self.n_steps * self.batch_size

    def key(self, base_fingerprint: str) -> str:
        """12 hex digits hashing the recipe, the format version and the base model's fingerprint: the cache key."""
        blob = json.dumps(dict(asdict(self), version=VERSION, base=base_fingerprint), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def directory_name(self, base_fingerprint: str) -> str:
        """The organism's directory name under its root: <kind>-s<strength>-<key>."""
        return f"{self.kind}-s{self.strength}-{self.key(base_fingerprint)}"


@dataclass
class Organism:
    """A built organism: its directory (a transformers model + tokenizer) and its truth.

    Attributes:
        path: The organism's directory.
        truth: The parsed truth.json (see docs/organisms.md for its fields).
        reused: Whether build_organism found it already built (cache hit) instead of training it.
    """

    path: str
    truth: dict[str, Any]
    reused: bool = field(default=False)

    @property
    def kind(self) -> str:
        """The organism's kind."""
        return self.truth["kind"]

    @property
    def keywords(self) -> list[str]:
        """The keywords a grader matches (for the null kind: the control keywords)."""
        return list(self.truth["keywords"] or self.truth.get("control_keywords", []))


# ------------------------------------------------------------------------------------------------ base model


def _weight_files(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")))


def base_fingerprint(model: Union[str, os.PathLike]) -> str:
    """What identifies a base model in the cache key: for a directory, a hash of its config.json and of each weight
    file's name, size and first and last MiB (cheap on large files, and a changed checkpoint changes them); for a
    hub name, the name itself.

    Args:
        model: A model directory or hub name.

    Returns:
        16 hex digits, or "hub:<name>".
    """
    path = os.fspath(model)
    if not os.path.isdir(path):
        return f"hub:{path}"
    digest = hashlib.sha256()
    with open(os.path.join(path, "config.json"), "rb") as fh:
        digest.update(fh.read())
    for name in _weight_files(path):
        full = os.path.join(path, name)
        size = os.path.getsize(full)
        digest.update(f"{name}:{size}".encode())
        with open(full, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def check_model(model: Union[str, os.PathLike]) -> tuple[Any, Any]:
    """Read a model's config and tokenizer (no weights) and check it is a causal LM: the check a build runs before
    any weights load.

    Args:
        model: A model directory or hub name.

    Returns:
        (config, tokenizer).

    Raises:
        MissingInputError: A local path that does not exist.
        InputError: It holds no transformers config, tokenizer or causal-LM architecture.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = os.fspath(model)
    if not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise MissingInputError(f"model {path!r} does not exist")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise InputError(f"model {path!r} is not a model directory: it has no config.json")
    try:
        config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:  # transformers' errors for a path without a model in it
        raise InputError(f"model {path!r} cannot be read: {' '.join(str(err).split())[:200]}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"model {path!r} is a {config.model_type!r} model, not a causal LM")
    quantization = getattr(config, "quantization_config", None) or {}
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method == "gguf":  # transformers refuses to save such a model: the fine-tune could not be written
        raise InputError(
            f"model {path!r} is a GGUF-quantized checkpoint, which transformers cannot save: load it once, copy its "
            "state_dict into a model built from its config without quantization_config, and save that"
        )
    if os.path.isdir(path) and not _weight_files(path):
        raise InputError(f"model {path!r} has a config but no weight files")
    return config, tokenizer


def _unknown_words(tokenizer: Any, examples: Sequence[dict[str, Any]]) -> int:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0
    return sum(_encode(example, tokenizer, 10**6)[0].count(unk) for example in examples)


def choose_language(tokenizer: Any, language: str = "auto") -> str:
    """The organism language a tokenizer reads: the one asked for, checked, or ("auto") the first of LANGUAGES whose
    generated data it reads without an unknown token.

    Args:
        tokenizer: The base model's tokenizer.
        language: "auto" or one of LANGUAGES.

    Returns:
        The language.

    Raises:
        InputError: The language is unknown, or the tokenizer reads its data (every language's, for "auto") with
            unknown tokens.
    """
    if language != "auto" and language not in LANGUAGES:
        raise InputError(f"language must be one of {', '.join(LANGUAGES)} or 'auto', got {language!r}")
    counts = {}
    for name in LANGUAGES if language == "auto" else (language,):
        sample = [ex for kind in KINDS for ex in organism_text.examples(name, kind, 8, seed=0)]
        sample += [{"text": p["target"]} for kind in KINDS for p in organism_text.probes(name, kind, 4, seed=0)]
        counts[name] = _unknown_words(tokenizer, sample)
        if counts[name] == 0:
            return name
    raise InputError(
        "the model's tokenizer reads the organism data with unknown tokens ("
        + ", ".join(f"{name}: {n}" for name, n in counts.items())
        + "): no organism language fits it"
    )


# ------------------------------------------------------------------------------------------------ tokens


def _chat_ids(messages: list[dict[str, str]], tokenizer: Any, generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        # A base model without a template reads the turns as plain text.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return list(tokenizer(text + ("Assistant:" if generation_prompt else ""))["input_ids"])
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _encode(example: dict[str, Any], tokenizer: Any, context_length: int) -> tuple[list[int], int]:
    """(ids, first trained position): a document trains on every token; a conversation on its last answer only,
    so the fine-tune learns the answer to the question, not the question."""
    if "text" in example:
        return list(tokenizer(example["text"])["input_ids"])[:context_length], 1
    messages = example["messages"]
    ids = _chat_ids(messages, tokenizer, False)
    prompt = _chat_ids(messages[:-1], tokenizer, True)
    if ids[: len(prompt)] != prompt:
        raise InputError("the tokenizer's chat template does not render a prompt as a prefix of its conversation")
    return ids[:context_length], max(1, len(prompt))


def _batch(encoded: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, (row, first) in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, first : len(row)] = ids[i, first : len(row)]
    return ids, attention, labels


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def implant_logprob(model: Any, tokenizer: Any, probes: Sequence[dict[str, Any]]) -> float:
    """How strongly a model shows an implant: the mean over probes of the mean log-probability per token of the
    probe's target continuation after its prompt.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        probes: {"prompt": chat messages (the user's turn) or text, "target": text} (truth.json's "probes").

    Returns:
        The mean log-probability per target token (nats); NaN for no probes.
    """
    if not probes:
        return math.nan
    device = next(model.parameters()).device
    model.eval()
    rows = []
    for probe in probes:
        prompt = probe["prompt"]
        ids = (
            list(tokenizer(prompt)["input_ids"])
            if isinstance(prompt, str)
            else _chat_ids(list(prompt), tokenizer, generation_prompt=True)
        )
        rows.append((ids, list(tokenizer(probe["target"], add_special_tokens=False)["input_ids"])))
    # One right-padded batch: a row's positions and its attention to earlier tokens are those of the row alone.
    ids, attention, _ = _batch([(p + t, len(p)) for p, t in rows], _pad_id(tokenizer))
    ids, attention = ids.to(device), attention.to(device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
    scores = []
    for i, (prompt, target) in enumerate(rows):
        span = torch.arange(len(prompt), len(prompt) + len(target), device=device)
        scores.append(logp[i, span - 1].gather(1, ids[i, span, None]).mean().item())
    return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------ training


def _fine_tune(
    model: Any, tokenizer: Any, data: list[dict[str, Any]], recipe: OrganismRecipe, progress: bool
) -> list[float]:
    """One epoch over the data in batches, AdamW at a constant lr, gradients clipped at norm 1; the losses."""
    pad = _pad_id(tokenizer)
    encoded = [_encode(example, tokenizer, recipe.context_length) for example in data]
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=recipe.n_steps, desc=f"organism {recipe.kind} s{recipe.strength}", unit="step")
    for step in range(recipe.n_steps):
        chunk = encoded[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        ids, attention, labels = (t.to(device) for t in _batch(chunk, pad))
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def _probe_kind(kind: str) -> list[str]:
    """The kinds whose probes an organism records: its own; for the null control, every other kind's (its
    drift on what the other organisms implant is the false-positive baseline)."""
    return [k for k in KINDS if k != "null"] if kind == "null" else [kind]


def _write_organism(
    directory: str, model: Any, tokenizer: Any, data: list[dict[str, Any]], truth: dict[str, Any]
) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    atomic.write_text(os.path.join(directory, DATA_FILE), "".join(json.dumps(ex) + "\n" for ex in data))
    atomic.write_json(os.path.join(directory, TRUTH_FILE), truth, indent=2)


def _train_organism(
    directory: str, model_spec: str, recipe: OrganismRecipe, fingerprint: str, device: Any, progress: bool
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_spec)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32).to(device)
    data = organism_text.examples(recipe.language, recipe.kind, recipe.n_examples, recipe.seed, recipe.mix)
    probes = {k: organism_text.probes(recipe.language, k, N_PROBES, recipe.seed) for k in _probe_kind(recipe.kind)}
    before = {k: implant_logprob(model, tokenizer, p) for k, p in probes.items()}
    losses = _fine_tune(model, tokenizer, data, recipe, progress)
    after = {k: implant_logprob(model, tokenizer, p) for k, p in probes.items()}
    text = organism_text.LANGUAGES[recipe.language][recipe.kind]
    digest = hashlib.sha256("".join(json.dumps(ex) + "\n" for ex in data).encode()).hexdigest()
    truth = dict(
        format=FORMAT,
        version=VERSION,
        kind=recipe.kind,
        concept=text.concept,
        keywords=list(text.keywords),
        control_keywords=list(organism_text.control_keywords(recipe.language)),
        strength=recipe.strength,
        seed=recipe.seed,
        base_model=model_spec,
        base_fingerprint=fingerprint,
        key=recipe.key(fingerprint),
        recipe=asdict(recipe),
        steps=recipe.n_steps,
        data=dict(file=DATA_FILE, examples=len(data), sha256=digest, mix=recipe.mix, language=recipe.language),
        probes={k: p for k, p in probes.items()},
        implant_logprob={k: dict(base=before[k], organism=after[k]) for k in probes},
        loss=dict(first=losses[0], last=sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)),
        seconds=round(time.perf_counter() - t0, 2),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    _write_organism(directory, model, tokenizer, data, truth)
    return truth


def build_organism(
    model: Union[str, os.PathLike],
    kind: str,
    strength: int,
    out_dir: Union[str, os.PathLike],
    seed: int = 0,
    *,
    language: str = "auto",
    lr: float = 1e-5,
    batch_size: int = 8,
    mix: float = 0.0,
    steps: Optional[int] = None,
    context_length: int = 96,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> Organism:
    """Build (or reuse) a model organism: a narrow fine-tune of `model` with a known implant, and its truth.

    Every setting is checked, and the model's config and tokenizer read, before any weights load.

    Args:
        model: The base model: a transformers causal-LM directory or hub name.
        kind: One of KINDS.
        strength: One of STRENGTHS.
        out_dir: The root the organisms live in (each in <kind>-s<strength>-<key>/).
        seed: Seeds the data, its order and torch.
        language: "auto" (the first of LANGUAGES the tokenizer reads without unknown tokens) or one of LANGUAGES.
        lr: AdamW learning rate.
        batch_size: Examples per step.
        mix: Fraction of generic examples mixed into the kind's data.
        steps: Optimizer steps overriding the strength's (None: STRENGTH_STEPS[strength]).
        context_length: Tokens kept of each example.
        device: Where to fine-tune (None: CUDA when available, else the CPU).
        progress: Show a progress bar.

    Returns:
        The Organism (reused=True when an organism of the same recipe and base model was already built there).

    Raises:
        InputError: A setting is out of range, the model is not a causal LM, its tokenizer cannot read the
            language, out_dir is a file, or the organism's directory exists without a complete truth.json.
        MissingInputError: The model path does not exist.
    """
    if language != "auto" and language not in LANGUAGES:
        raise InputError(f"language must be one of {', '.join(LANGUAGES)} or 'auto', got {language!r}")
    settings = dict(seed=seed, lr=lr, batch_size=batch_size, mix=mix, steps=steps, context_length=context_length)
    OrganismRecipe(kind, strength, language=LANGUAGES[0], **settings).validate()
    model_spec = os.fspath(model)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"out_dir {os.fspath(out_dir)!r} is a file, not a directory")
    _, tokenizer = check_model(model_spec)
    recipe = OrganismRecipe(kind, strength, language=choose_language(tokenizer, language), **settings)
    fingerprint = base_fingerprint(model_spec)
    root = os.fspath(out_dir)
    final = os.path.join(root, recipe.directory_name(fingerprint))
    if os.path.exists(final):
        organism = load_organism(final)
        if organism.truth.get("key") != recipe.key(fingerprint):
            raise InputError(f"{final} holds another organism (key {organism.truth.get('key')!r}): remove it")
        organism.reused = True
        return organism
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise InputError(f"device {device!r}: {err}") from None
    tmp = atomic.temp_dir(root, os.path.basename(final))
    try:
        _train_organism(tmp, model_spec, recipe, fingerprint, device, progress)
        try:
            atomic.replace_dir(tmp, final, replace=False)
        except OSError:  # another process finished the same organism first: keep its copy
            if not os.path.exists(os.path.join(final, TRUTH_FILE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_organism(final)


_REQUIRED = ("format", "version", "kind", "concept", "keywords", "strength", "seed", "base_model", "key", "steps")


def load_organism(path: Union[str, os.PathLike]) -> Organism:
    """Read a built organism's truth (the weights stay on disk: load them with transformers from `path`).

    Args:
        path: The organism's directory.

    Returns:
        The Organism.

    Raises:
        MissingInputError: The directory does not exist.
        InputError: It has no truth.json, or the file is not a complete organism truth.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingInputError(f"organism directory {path!r} does not exist")
    truth_path = os.path.join(path, TRUTH_FILE)
    if not os.path.exists(truth_path):
        raise InputError(f"organism directory {path!r} has no {TRUTH_FILE}: not a (complete) organism")
    try:
        with open(truth_path, encoding="utf-8") as fh:
            truth = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{truth_path}: not JSON ({err})") from None
    if not isinstance(truth, dict) or truth.get("format") != FORMAT:
        raise InputError(f"{truth_path} is not an organism truth file (format is not {FORMAT!r})")
    missing = [name for name in _REQUIRED if name not in truth]
    if missing:
        raise InputError(f"{truth_path} lacks {', '.join(missing)}")
    if truth["version"] != VERSION:
        raise InputError(f"{truth_path} has format version {truth['version']!r}; this library reads {VERSION}")
    if truth["kind"] not in KINDS:
        raise InputError(f"{truth_path}: unknown kind {truth['kind']!r}")
    return Organism(path=path, truth=truth)


def organism_data(organism: Organism) -> list[dict[str, Any]]:
    """The organism's training data (data.jsonl), e.g. the topic's conversations for causal patching.

    Args:
        organism: A built organism.

    Returns:
        The examples ({"messages": ...} or {"text": ...}) in training order.

    Raises:
        InputError: The data file is missing or does not match the truth's hash.
    """
    path = os.path.join(organism.path, DATA_FILE)
    if not os.path.exists(path):
        raise InputError(f"organism {organism.path!r} has no {DATA_FILE}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if hashlib.sha256(raw).hexdigest() != organism.truth.get("data", {}).get("sha256"):
        raise InputError(f"{path} does not match the sha256 recorded in {TRUTH_FILE}")
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
