"""Causal evidence for latents: the paper's activation-patching experiment and a first-order causal score per latent.

The site is the residual stream after block L, the crosscoder's layer; the same token ids go through both models.
Per batch, the base model runs up to block L (h_base), the chat model runs in full (h_chat at block L and the
unedited next-token distribution P_chat), and the crosscoder encodes the pair in inference mode. A latent set S
then patches, at every position from `ignore_first` on,

    "replace" (default):  h~ = h_base + sum_{j in S} f_j (W_dec[j, chat] - W_dec[j, base])
    "add":                h~ = h_base + sum_{j in S} f_j W_dec[j, chat]

with the decoder rows taken to raw activation space (divided by the crosscoder's input scale), and the chat model
runs again with block L's output replaced by h~ (blocks 0..L skipped: their outputs would be overwritten). Positions
before `ignore_first` keep the chat model's own h_chat in every set, "none" included: the crosscoder is not trained
on them (real models put a massive activation on the first position, an attention sink every later position reads),
so a difference there is one no latent can express. With ignore_first=0 every position is patched, as in the paper's
code. The metric is KL(P_chat || P_patched) per scored position (diffing.scored_positions), reported per subset as
mean, 95% half-width (1.96 sd / sqrt(n)) and n. Two sets are always run: "none" (S empty: h_base into the chat
model's rest) and "all" (h_base - xhat_base + xhat_chat, the base reconstruction error plus the chat reconstruction,
decoder biases and input means included). Sets named random_<i> are also pooled as "random".

attribution scores every latent at once: the first-order change of the summed KL when latent j alone is patched
in at h_base, sum_t f_j(t) dW_j . grad_{h_t} KL(P_chat || P(h)) at h = h_base (one forward and backward of the chat
model per batch). Negative: patching the latent in lowers the KL.
"""

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .. import ops
from ..data.activations import read_documents, template_token_ids
from ..errors import InputError, require_int
from ..layer import CrossCoder
from ..models.blocks import block_hidden, decoder_blocks, output_format, run_to_layer, skip_through_layer
from ..models.loading import ModelSpec, load_pair, model_name, place_model
from .latent_sets import paper_latent_sets
from .scored_positions import SUBSETS, check_documents, is_conversation, score_document, subset_mask

__all__ = ["PatchResult", "attribution", "paper_latent_sets", "patch_kl", "raw_decoder_difference"]

VARIANTS = ("replace", "add")
BUILT_IN = ("none", "all")
_RANDOM = re.compile(r"random_\d+$")

Data = Union[os.PathLike, str, Iterable[Any]]


@dataclass
class PatchResult:
    """What patch_kl returns.

    Attributes:
        kl: {set name: {subset: (mean, ci95_half_width, n)}}: the KL(P_chat || P_patched) per scored position;
            "none" and "all" always among the set names, "random" when random_<i> sets were run; mean and
            half-width are NaN where n is 0 (and the half-width where n is 1).
        set_sizes: {set name: number of latents} (F for "all", 0 for "none").
        variant: "replace" or "add".
        layer: The patched block.
        first_k: Assistant tokens per turn in subset "first_k".
        ignore_first: Positions before it were neither patched nor scored.
        documents: Documents read.
        base: The base model (path, hub name or class name).
        chat: The chat model, likewise.
    """

    kl: dict[str, dict[str, tuple[float, float, int]]]
    set_sizes: dict[str, int]
    variant: str
    layer: int
    first_k: int
    ignore_first: int
    documents: int
    base: str = ""
    chat: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the settings and kl[set][subset] = {"mean", "ci95", "n"} (None for NaN)."""

        def number(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        kl = {
            name: {s: {"mean": number(m), "ci95": number(c), "n": n} for s, (m, c, n) in subsets.items()}
            for name, subsets in self.kl.items()
        }
        settings = {k: getattr(self, k) for k in ("variant", "layer", "first_k", "ignore_first", "documents")}
        return dict(settings, base=self.base, chat=self.chat, set_sizes=self.set_sizes, kl=kl)

    def table(self, subset: str = "all") -> str:
        """A plain-text table of one subset: set, latents, mean KL +- 95% half-width, n."""
        lines = [f"{'set':<24} {'latents':>8} {'KL(P_chat || P_patched)':>26} {'n':>8}"]
        for name, subsets in self.kl.items():
            mean, ci, n = subsets.get(subset, (math.nan, math.nan, 0))
            size = self.set_sizes.get(name, "")
            lines.append(f"{name:<24} {size!s:>8} {mean:>15.4f} +- {ci:<8.4f} {n:>8}")
        return "\n".join(lines)


@dataclass
class _Accumulator:
    """Per-subset sums of the KL and its square, in float64, for the mean and its CI."""

    sums: dict[str, list[float]] = field(default_factory=lambda: {s: [0.0, 0.0, 0] for s in SUBSETS})

    def add(self, kl: torch.Tensor, labels: torch.Tensor) -> None:
        for subset in SUBSETS:
            values = kl[subset_mask(labels, subset)].double()
            entry = self.sums[subset]
            entry[0] += float(values.sum())
            entry[1] += float((values * values).sum())
            entry[2] += int(values.numel())

    def merge(self, other: "_Accumulator") -> None:
        for subset in SUBSETS:
            for i in range(3):
                self.sums[subset][i] += other.sums[subset][i]

    def result(self, subsets: Sequence[str]) -> dict[str, tuple[float, float, int]]:
        out = {}
        for subset in subsets:
            total, squares, n = self.sums[subset]
            mean = total / n if n else math.nan
            var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.nan
            out[subset] = (mean, 1.96 * math.sqrt(var / n) if n > 1 else math.nan, n)
        return out


def raw_decoder_difference(crosscoder: CrossCoder, variant: str = "replace") -> torch.Tensor:
    """The per-latent patch direction in raw activation space: W_dec[j, chat] / s_chat - W_dec[j, base] / s_base
    ("replace") or W_dec[j, chat] / s_chat ("add"), with s the input scale (1 without normalisation).

    Args:
        crosscoder: A two-model crosscoder (model 0 = base, 1 = chat).
        variant: "replace" or "add".

    Returns:
        [F, d] float32.

    Raises:
        InputError: variant is unknown.
    """
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}")
    W = crosscoder.W_dec.detach().float()
    scale = crosscoder.input_scale.float() if crosscoder.target_rms is not None else torch.ones(2, device=W.device)
    chat = W[:, 1] / scale[1]
    return (chat - W[:, 0] / scale[0] if variant == "replace" else chat).contiguous()


def _check_crosscoder(crosscoder):
    if not isinstance(crosscoder, CrossCoder):
        raise InputError(f"crosscoder must be a crossdiff_ext.CrossCoder, got {type(crosscoder).__name__}")
    if crosscoder.n_models != 2:
        raise InputError(f"crosscoder must be over 2 models (base, chat), got n_models = {crosscoder.n_models}")
    if crosscoder.activation == "batch_topk" and float(crosscoder.threshold) < 0:
        raise InputError("the crosscoder's inference threshold is unset (-1): patching needs its inference-mode codes")


def _check_sets(latent_sets, n_latents):
    if not isinstance(latent_sets, Mapping):
        raise InputError(f"latent_sets must map set names to latent-id tensors, got {type(latent_sets).__name__}")
    checked = {}
    for name, ids in latent_sets.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"latent set names must be non-empty strings, got {name!r}")
        if name in BUILT_IN + ("random",):
            raise InputError(f"latent set name {name!r} is reserved (built-in sets: {BUILT_IN}, pooled: 'random')")
        ids = torch.as_tensor(ids)
        if ids.numel() == 0:
            raise InputError(f"latent set {name!r} is empty")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
            raise InputError(
                f"latent set {name!r} must be a 1-D tensor of integer latent ids, got {ids.dtype} {list(ids.shape)}"
            )
        bad = ids[(ids < 0) | (ids >= n_latents)]
        if bad.numel():
            raise InputError(f"latent set {name!r} has ids outside [0, {n_latents}): {bad[:5].tolist()}")
        if torch.unique(ids).numel() != ids.numel():
            raise InputError(f"latent set {name!r} lists a latent more than once")
        checked[name] = ids.long()
    return checked


@dataclass
class _Pair:
    base: Any
    chat: Any
    tokenizer: Any
    layer: int


def _open(base, chat, crosscoder, layer, device, model_dtype=None):
    (m_base, _), (m_chat, tokenizer) = load_pair(base, chat, [layer], dtype=model_dtype, width=crosscoder.d_model)
    return _Pair(place_model(base, m_base, device), place_model(chat, m_chat, device), tokenizer, layer)


def _documents(pair, docs, *, context_length, first_k, ignore_first):
    template = template_token_ids(pair.tokenizer) if any(is_conversation(d) for d in docs) else ()
    scored = [
        score_document(
            doc,
            pair.tokenizer,
            context_length=context_length,
            first_k=first_k,
            ignore_first=ignore_first,
            template_ids=template,
        )
        for doc in docs
    ]
    return [s for s in scored if s.ids]


def _padded(batch, pad, device):
    length = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), length), pad, dtype=torch.long)
    attention = torch.zeros(len(batch), length, dtype=torch.long)
    labels = torch.zeros(len(batch), length, dtype=torch.int8)
    for i, s in enumerate(batch):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attention[i, : len(s.ids)] = 1
        labels[i, : len(s.ids)] = s.labels
    return ids.to(device), attention.to(device), labels.to(device)


def _device_of(model):
    return next(model.parameters()).device


@dataclass
class _Batch:
    """One padded batch with both models' block-L states and the chat model's log-probabilities where scored."""

    ids: torch.Tensor
    attention: torch.Tensor
    labels: torch.Tensor  # [B, T], scored positions != 0
    patched: torch.Tensor  # [B, T] bool: the positions a latent set edits
    h_base: torch.Tensor
    h_chat: torch.Tensor
    logp_chat: torch.Tensor  # [n_scored, V] fp32 (or wider)
    formats: list  # models.blocks.output_format of the chat model's blocks 0..L
    p_chat: torch.Tensor = None  # exp(logp_chat), once per batch rather than once per latent set
    h_none: torch.Tensor = None  # set "none": h_base at the patched positions, h_chat elsewhere

    def __post_init__(self):
        self.p_chat = self.logp_chat.exp()
        self.h_none = self.h_chat.clone()
        self.h_none[self.patched] = self.h_base[self.patched]


def _recorded_forward(pair, ids, attention):
    """The chat model's plain forward, recording block L's output and the output format of blocks 0..L."""
    blocks = decoder_blocks(pair.chat)
    formats, kept = [None] * (pair.layer + 1), {}

    def record(i):
        def hook(module, args, output):
            formats[i] = output_format(output)
            if i == pair.layer:
                kept["h"] = block_hidden(output)

        return hook

    handles = [blocks[i].register_forward_hook(record(i)) for i in range(pair.layer + 1)]
    try:
        logits = pair.chat(input_ids=ids, attention_mask=attention, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, kept["h"], formats


def _patched_logits(pair, batch, h):
    """The chat model's logits with block L's output h; blocks 0..L are skipped (their outputs would be
    overwritten)."""
    with skip_through_layer(pair.chat, pair.layer, h, batch.formats):
        return pair.chat(input_ids=batch.ids, attention_mask=batch.attention, use_cache=False).logits


def _batches(pair, scored, batch_size, ignore_first, progress) -> Iterator[_Batch]:
    pad = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(scored), desc="patching", unit="doc", dynamic_ncols=True)
    try:
        for start in range(0, len(scored), batch_size):
            chunk = scored[start : start + batch_size]
            ids, attention, labels = _padded(chunk, pad, _device_of(pair.chat))
            with torch.no_grad():
                h_base = run_to_layer(
                    pair.base, pair.layer, input_ids=ids.to(_device_of(pair.base)), attention_mask=attention
                ).to(ids.device)
                logits, h_chat, formats = _recorded_forward(pair, ids, attention)
            positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
            patched = attention.bool() & (positions >= ignore_first)
            scored_mask = labels != 0
            yield _Batch(ids, attention, labels, patched, h_base, h_chat, _log_probs(logits[scored_mask]), formats)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()


def _codes(crosscoder, batch):
    x = torch.stack([batch.h_base[batch.patched], batch.h_chat[batch.patched]], dim=1)
    x = x.to(crosscoder.W_enc.device, crosscoder.input_dtype)
    with torch.no_grad():
        return crosscoder.encode(x, use_threshold=crosscoder.activation == "batch_topk")


def _log_probs(logits):
    """Log-probabilities in fp32 at least (a float64 model keeps float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _kl(batch, logits):
    """KL(P_chat || P) per scored position, P from the scored positions' logits."""
    return (batch.p_chat * (batch.logp_chat - _log_probs(logits))).sum(-1)


def _run_patched(pair, batch, delta):
    """KL per scored position of the chat model with block L's output h_base + delta at the patched positions."""
    h = batch.h_none.clone()  # the later blocks receive it: keep the batch's copy safe from in-place edits
    if delta is not None:
        wide = torch.promote_types(h.dtype, torch.float32)  # add in fp32 (or the model's wider dtype), then round
        h[batch.patched] = (batch.h_base[batch.patched].to(wide) + delta.to(h.device, wide)).to(h.dtype)
    with torch.no_grad():
        logits = _patched_logits(pair, batch, h)
    return _kl(batch, logits[batch.labels != 0])


def _prepare(crosscoder, layer, data, first_k, ignore_first, batch_size, context_length):
    _check_crosscoder(crosscoder)
    require_int("layer", layer, 0)
    require_int("first_k", first_k, 1)
    require_int("ignore_first", ignore_first, 0)
    require_int("batch_size", batch_size, 1)
    require_int("context_length", context_length, 1)
    docs = read_documents(data)
    check_documents(docs)
    return docs


def patch_kl(
    base: ModelSpec,
    chat: ModelSpec,
    crosscoder: CrossCoder,
    layer: int,
    data: Data,
    latent_sets: Mapping[str, Union[torch.Tensor, Sequence[int]]],
    *,
    variant: str = "replace",
    first_k: int = 10,
    ignore_first: int = 1,
    batch_size: int = 8,
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = True,
    context_length: int = 1024,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
) -> PatchResult:
    """The paper's activation-patching experiment (see the module docstring).

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The chat model, likewise; its tokenizer (and chat template) reads the data.
        crosscoder: A two-model crosscoder of the models' layer `layer` (model 0 = base, 1 = chat).
        layer: The block whose output is patched.
        data: Documents as collect reads them: a JSONL / .txt file or directory, "hf:NAME[:SPLIT]", or an
            iterable of strings, message lists or {"text" | "messages"} records.
        latent_sets: {name: latent ids}; "none" and "all" are added.
        variant: "replace" (default) or "add".
        first_k: Assistant tokens per turn in subset "first_k".
        ignore_first: Positions before it are neither patched nor scored: they keep h_chat (default 1: the first
            position's massive activation).
        batch_size: Documents per forward.
        device: Where the models run (default: loaded models on CUDA when available, given ones where they are).
        progress: Show a tqdm bar over documents.
        context_length: Tokens kept per document.
        model_dtype: dtype to load the models in (None: the checkpoint's).

    Returns:
        The PatchResult; .kl[set][subset] = (mean, ci95_half_width, n).

    Raises:
        InputError: Bad arguments, models that do not fit each other or the crosscoder, empty or unknown latent
            ids, or a conversation without an assistant turn (all before any model runs).
    """
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}, got {variant!r}")
    docs = _prepare(crosscoder, layer, data, first_k, ignore_first, batch_size, context_length)
    sets = _check_sets(latent_sets, crosscoder.dict_size)
    pair = _open(base, chat, crosscoder, layer, device, model_dtype)
    scored = _documents(pair, docs, context_length=context_length, first_k=first_k, ignore_first=ignore_first)
    was_training = crosscoder.training
    crosscoder.eval()
    direction = raw_decoder_difference(crosscoder, variant)[:, None, :]
    members = _set_members(sets, crosscoder.dict_size, direction.device)
    totals = {name: _Accumulator() for name in BUILT_IN + tuple(sets)}
    try:
        for batch in _batches(pair, scored, batch_size, ignore_first, progress):
            _patch_batch(pair, crosscoder, batch, direction, members, totals)
    finally:
        crosscoder.train(was_training)
    subsets = SUBSETS if any(is_conversation(d) for d in docs) else ("all",)
    kl = {name: acc.result(subsets) for name, acc in totals.items()}
    sizes = {"none": 0, "all": crosscoder.dict_size} | {name: int(ids.numel()) for name, ids in sets.items()}
    _pool_random_sets(kl, sizes, totals, subsets)
    return PatchResult(
        kl, sizes, variant, layer, first_k, ignore_first, len(docs), base=model_name(base), chat=model_name(chat)
    )


def _set_members(sets, dict_size, device):
    """{name: [F] bool mask of the set's latents}."""
    members = {}
    for name, ids in sets.items():
        member = torch.zeros(dict_size, dtype=torch.bool, device=device)
        member[ids.to(device)] = True
        members[name] = member
    return members


def _patch_batch(pair, crosscoder, batch, direction, members, totals):
    """Add one batch's KL at the scored positions to each set's total: "none", "all", then every latent set."""
    labels = batch.labels[batch.labels != 0]
    codes = _codes(crosscoder, batch)
    with torch.no_grad():
        recon = crosscoder.decode(codes).float()
    totals["none"].add(_run_patched(pair, batch, None), labels)
    totals["all"].add(_run_patched(pair, batch, recon[:, 1] - recon[:, 0]), labels)
    values = codes.values.float()
    for name, member in members.items():
        chosen = values * member[codes.indices.long()]
        delta = ops.sparse_decode(chosen, codes.indices, codes.row_ptr, direction)[:, 0]
        totals[name].add(_run_patched(pair, batch, delta), labels)


def _pool_random_sets(kl, sizes, totals, subsets):
    """In place: the random sets (random_*) pooled as one "random" entry of kl and sizes, when there are any."""
    randoms = [name for name in totals if _RANDOM.match(name)]
    if randoms:
        pooled = _Accumulator()
        for name in randoms:
            pooled.merge(totals[name])
        kl["random"] = pooled.result(subsets)
        sizes["random"] = sizes[randoms[0]]


def attribution(
    base: ModelSpec,
    chat: ModelSpec,
    crosscoder: CrossCoder,
    layer: int,
    data: Data,
    *,
    ignore_first: int = 1,
    batch_size: int = 8,
    device: Optional[Union[torch.device, str]] = None,
    variant: str = "replace",
    first_k: int = 10,
    subset: str = "all",
    progress: bool = False,
    context_length: int = 1024,
    model_dtype: Optional[Union[torch.dtype, str]] = None,
) -> torch.Tensor:
    """A first-order causal score of every latent (attribution patching; see the module docstring).

    Args:
        base: The base model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        chat: The chat model, likewise.
        crosscoder: A two-model crosscoder of the models' layer `layer`.
        layer: The block whose output is patched.
        data: Documents, as for patch_kl.
        ignore_first: Positions before it are neither patched nor scored.
        batch_size: Documents per forward and backward.
        device: Where the models run (as for patch_kl).
        variant: The patch direction, "replace" (default) or "add".
        first_k: Assistant tokens per turn in subset "first_k".
        subset: The positions whose KL is summed: "all", "first_k" or "rest".
        progress: Show a tqdm bar over documents.
        context_length: Tokens kept per document.
        model_dtype: dtype to load the models in (None: the checkpoint's).

    Returns:
        [F] float64: per latent, the first-order change of the KL summed over the scored positions when it alone
        is patched in; negative lowers the KL.

    Raises:
        InputError: As for patch_kl, or subset is unknown.
    """
    if subset not in SUBSETS:
        raise InputError(f"subset must be one of {SUBSETS}, got {subset!r}")
    docs = _prepare(crosscoder, layer, data, first_k, ignore_first, batch_size, context_length)
    direction = raw_decoder_difference(crosscoder, variant)[:, None, :]
    pair = _open(base, chat, crosscoder, layer, device, model_dtype)
    scored = _documents(pair, docs, context_length=context_length, first_k=first_k, ignore_first=ignore_first)
    score = torch.zeros(crosscoder.dict_size, dtype=torch.float64, device=direction.device)
    was_training = crosscoder.training
    crosscoder.eval()
    try:
        for batch in _batches(pair, scored, batch_size, ignore_first, progress):
            codes = _codes(crosscoder, batch)
            h = batch.h_none.detach().clone().requires_grad_(True)
            chosen = subset_mask(batch.labels[batch.labels != 0], subset)
            with torch.enable_grad():
                logits = _patched_logits(pair, batch, h)
                kl = _kl(batch, logits[batch.labels != 0])[chosen].sum()
                (grad,) = torch.autograd.grad(kl, h)
            g = grad[batch.patched].float().to(direction.device)
            dots = ops.sparse_values_grad(g[:, None, :].contiguous(), codes.indices, codes.row_ptr, direction)
            score.index_add_(0, codes.indices.long(), (codes.values.float() * dots).double())
    finally:
        crosscoder.train(was_training)
    return score.cpu()
