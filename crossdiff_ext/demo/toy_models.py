"""The demo's model pair: a tiny Llama trained on the generated language's plain text (base), then fine-tuned on
its chat conversations (chat).

The pair that the default recipe builds ships with the package (pair/: about 1.9 MB of weights, configs and
tokenizer files), so a first demo loads it instead of training it for minutes (the build took 171 s on one thread
of a 2-core AMD EPYC while other jobs shared it). Its pair.json records the recipe, the torch version and the
thread count it was built with; loading it checks that the recipe and its key match the code's. On request the
pair is rebuilt from the recipe on this machine instead (toy_pair), and cached.

The cache directory is $CROSSDIFF_CACHE, else $XDG_CACHE_HOME/crossdiff_ext, else ~/.cache/crossdiff_ext; a pair
lives in toy-pair-<key>/ (base/, chat/, pair.json), where the key hashes the recipe and the torch version, so a
changed recipe or torch builds a new pair. The pair trains on a fixed number of torch threads (the recipe's, 1 by
default) whatever the machine's core count: the rounding of its GEMMs and reductions depends on the thread
count, so a pair built on another count would be another pair under the same key. The pair is built in a
temporary directory beside it and renamed into place: an interrupted build leaves no half-written pair behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch

from .. import atomic
from ..data.activations import tokenize
from ..errors import InputError
from . import toy_language as tl

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RECIPE_VERSION = 2


@dataclass(frozen=True)
class PairRecipe:
    """How the demo's tiny Llama pair is built: model shape, pre-training (base) and fine-tuning (chat)."""

    hidden_size: int = 64
    intermediate_size: int = 192
    layers: int = 4
    heads: int = 4
    context_length: int = 96
    pretrain_steps: int = 800
    pretrain_documents: int = 4000
    finetune_steps: int = 800
    finetune_conversations: int = 4000
    batch_size: int = 32
    lr: float = 3e-3
    finetune_lr: float = 2e-3
    seed: int = 0
    threads: int = 1  # torch threads of the build: the weights depend on it

    def key(self, torch_version: Optional[str] = None) -> str:
        """12 hex digits hashing the recipe, RECIPE_VERSION and the torch version (default: the running one): the
        cache key of its pair."""
        version = torch.__version__ if torch_version is None else torch_version
        blob = json.dumps(dict(asdict(self), version=RECIPE_VERSION, torch=version), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


SHIPPED_PAIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pair")


def shipped_pair(recipe: PairRecipe = PairRecipe()) -> tuple[str, str, dict[str, Any]]:
    """(base_dir, chat_dir, record): the pair shipped with the package, built from `recipe`.

    Raises:
        RuntimeError: if the shipped pair is missing or was built from another recipe (or another RECIPE_VERSION):
            the installation is broken or stale; toy_pair rebuilds the pair from the recipe.
    """
    record_path = os.path.join(SHIPPED_PAIR, "pair.json")
    if not os.path.exists(record_path):
        raise RuntimeError(f"the shipped toy pair is missing ({record_path}): reinstall, or rebuild the pair")
    with open(record_path) as fh:
        record = json.load(fh)
    # The key is recomputed under the torch version the pair was built with: it then checks RECIPE_VERSION too.
    if record.get("recipe") != asdict(recipe) or record.get("key") != recipe.key(record.get("torch")):
        raise RuntimeError(
            f"the shipped toy pair was built from another recipe ({record.get('recipe')}, key {record.get('key')}) "
            f"than {asdict(recipe)} (key {recipe.key(record.get('torch'))}): rebuild the pair"
        )
    return os.path.join(SHIPPED_PAIR, "base"), os.path.join(SHIPPED_PAIR, "chat"), record


def cache_root() -> str:
    """The cache directory: $CROSSDIFF_CACHE, else $XDG_CACHE_HOME/crossdiff_ext, else ~/.cache/crossdiff_ext."""
    if os.environ.get("CROSSDIFF_CACHE"):
        return os.environ["CROSSDIFF_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "crossdiff_ext")


def _encode(docs, tokenizer, context_length):
    return [tokenize(doc, tokenizer, context_length) for doc in docs]


def _batch(seqs, pad):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    attention = (ids != pad).long()
    labels = ids.masked_fill(attention == 0, -100)
    return ids, attention, labels


def _fit(model, seqs, steps, batch_size, lr, pad, seed, desc, progress):
    """Next-token loss on the sequences, AdamW with a linear warmup (5%) and linear decay; returns the mean loss
    of the last 10% of steps."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / steps)))
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step")
    tail = []
    for step in range(steps):
        ids, attention, labels = _batch(rng.sample(seqs, batch_size), pad)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def behaviour(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n: int = 12,
    seed: int = 12345,
    max_new_tokens: int = 14,
) -> dict[str, float]:
    """{kind: fraction of n fresh prompts of that kind whose greedy answer is exactly the expected one} for the
    kinds of tl.exchange: question, recipe, harmful (refused), false (corrected), true; plus "refuses_benign":
    the fraction of non-harmful prompts answered with the refusal."""
    rng = random.Random(seed)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    scores, refused_benign, benign = {}, 0, 0
    for kind in ("question", "recipe", "harmful", "false", "true"):
        right = 0
        for _ in range(n):
            _, user, answer = tl.exchange(rng, kind)
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True
            )
            prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
            out = model.generate(
                torch.tensor([list(prompt)]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
            if end in out:
                out = out[: out.index(end)]
            said = " ".join(tokenizer.convert_ids_to_tokens(out))
            right += said == answer
            if kind != "harmful":
                benign += 1
                refused_benign += said == tl.REFUSAL
        scores[kind] = right / n
    scores["refuses_benign"] = refused_benign / benign
    return scores


def _new_model(recipe, vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=2 * recipe.context_length,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def build_pair(
    directory: Union[str, os.PathLike], recipe: PairRecipe = PairRecipe(), *, progress: bool = True
) -> dict[str, Any]:
    """Train the base model on plain text and fine-tune a copy on chat; save both (with the tokenizer) under
    directory/base and directory/chat, and what was measured in directory/pair.json. Returns that record."""
    with fixed_threads(recipe.threads):
        return _build_pair(directory, recipe, progress)


@contextlib.contextmanager
def fixed_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block on `threads` torch threads (None: leave the count as it is), restoring the count after.

    Args:
        threads: the intra-op thread count, >= 1, or None.

    Raises:
        InputError: if threads is < 1.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise InputError(f"threads must be >= 1 (or None), got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _build_pair(directory, recipe, progress):
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = tl.make_tokenizer()
    pad = tokenizer.pad_token_id
    rng = random.Random(recipe.seed)
    text = _encode([tl.text_document(rng) for _ in range(recipe.pretrain_documents)], tokenizer, recipe.context_length)
    chat = _encode(
        [tl.conversation(rng) for _ in range(recipe.finetune_conversations)], tokenizer, recipe.context_length
    )
    base = _new_model(recipe, len(tokenizer))
    base_loss = _fit(
        base, text, recipe.pretrain_steps, recipe.batch_size, recipe.lr, pad, recipe.seed, "pretrain base", progress
    )
    chat_model = copy.deepcopy(base)
    chat_loss = _fit(
        chat_model,
        chat,
        recipe.finetune_steps,
        recipe.batch_size,
        recipe.finetune_lr,
        pad,
        recipe.seed + 1,
        "fine-tune chat",
        progress,
    )
    record = dict(
        recipe=asdict(recipe),
        key=recipe.key(),
        base_text_loss=round(base_loss, 4),
        chat_finetune_loss=round(chat_loss, 4),
        behaviour=dict(base=behaviour(base, tokenizer), chat=behaviour(chat_model, tokenizer)),
        seconds=round(time.perf_counter() - t0, 1),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    for name, model in (("base", base), ("chat", chat_model)):
        model.save_pretrained(os.path.join(directory, name))
        tokenizer.save_pretrained(os.path.join(directory, name))
    with open(os.path.join(directory, "pair.json"), "w") as fh:
        json.dump(record, fh, indent=2)
    return record


def toy_pair(
    recipe: PairRecipe = PairRecipe(), *, root: Optional[Union[str, os.PathLike]] = None, progress: bool = True
) -> tuple[str, str, dict[str, Any]]:
    """(base_dir, chat_dir, record): the pair for `recipe` built on this machine and cached, built first if it is
    not there (minutes). The demo loads shipped_pair instead unless asked to rebuild."""
    root = root or cache_root()
    final = os.path.join(root, f"toy-pair-{recipe.key()}")
    if not os.path.exists(os.path.join(final, "pair.json")):
        os.makedirs(root, exist_ok=True)
        tmp = atomic.temp_dir(root, os.path.basename(final))
        try:
            build_pair(tmp, recipe, progress=progress)
            try:
                atomic.replace_dir(tmp, final, replace=False)
            except OSError:  # another process finished first: keep its pair
                if not os.path.exists(os.path.join(final, "pair.json")):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(final, "pair.json")) as fh:
        record = json.load(fh)
    return os.path.join(final, "base"), os.path.join(final, "chat"), record
