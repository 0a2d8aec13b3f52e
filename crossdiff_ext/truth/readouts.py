"""What a trained crosscoder says about its latents, in the grader's terms: its most fine-tuned-leaning live latents,
and per latent the logit lens of its fine-tuned decoder row and the text of its top activating contexts (the
LatentReadout that grade_latents scores against an organism's truth)."""

from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..data import ActivationStore
from ..diffing import examples as latent_examples
from ..diffing import lens
from ..diffing.latent_scaling import inference_pass
from ..errors import InputError
from ..layer import CrossCoder
from ..layer.norms import delta_norm
from ..models.loading import ModelSpec, load_model
from .grading import TOP, LatentReadout


def fired_latents(crosscoder: CrossCoder, store: ActivationStore, batch_size: int = 4096) -> torch.Tensor:
    """Which latents the crosscoder (in inference mode) selects on at least one of the store's rows.

    Args:
        crosscoder: A trained crosscoder of the store's models.
        store: Paired activations.
        batch_size: Rows per forward.

    Returns:
        [dict_size] bool.
    """
    fired = torch.zeros(crosscoder.dict_size, dtype=torch.bool, device=crosscoder.W_enc.device)
    with torch.inference_mode(), inference_pass(crosscoder, store, batch_size) as batches:
        for x in batches:
            x = crosscoder.normalize(x.float()).to(crosscoder.input_dtype)
            codes = crosscoder.encode(x, normalized=True, use_threshold=crosscoder.activation == "batch_topk")
            fired[codes.indices.long()[codes.values != 0]] = True
    fired = fired.cpu()
    return fired


def fine_tune_leaning_latents(
    crosscoder: CrossCoder, store: ActivationStore, n: int = TOP, *, base: int = 0, chat: int = 1
) -> tuple[list[int], list[float]]:
    """The n live latents (fired on the store) with the highest Delta_norm: those whose decoder lives most in the
    fine-tuned model, highest first (ties: lower id first).

    Args:
        crosscoder: A trained crosscoder.
        store: Paired activations that decide which latents are live.
        n: How many.
        base: Model index of the base model.
        chat: Model index of the fine-tuned model.

    Returns:
        (latent ids, their Delta_norm).

    Raises:
        InputError: n < 1.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"n must be an int >= 1, got {n!r}")
    live = fired_latents(crosscoder, store)
    dn = delta_norm(crosscoder, base=base, chat=chat).detach().cpu()
    ranked = [j for j in torch.argsort(dn, descending=True, stable=True).tolist() if live[j]][:n]
    return ranked, [float(dn[j]) for j in ranked]


def crosscoder_readouts(
    crosscoder: CrossCoder,
    store: ActivationStore,
    fine_tuned: ModelSpec,
    latents: Sequence[int],
    *,
    chat: int = 1,
    top: int = TOP,
    n_contexts: int = 5,
    device: Optional[Any] = None,
) -> list[LatentReadout]:
    """Per latent: the `top` tokens of the fine-tuned model's logit lens of its fine-tuned decoder row (the model's
    final norm and unembedding; the row's scale does not matter under the final norm), and the decoded text of its
    n_contexts top activating contexts in the store.

    Args:
        crosscoder: A trained crosscoder (its inference threshold set).
        store: Paired activations with token ids (the contexts come from it).
        fine_tuned: The fine-tuned model: a directory, a hub name, or a loaded (model, tokenizer) pair.
        latents: The latent ids, in the order to grade them.
        chat: Model index of the fine-tuned model in the crosscoder.
        top: Tokens per latent.
        n_contexts: Contexts per latent.
        device: Where a loaded-by-name model runs (default: the CPU).

    Returns:
        One LatentReadout per latent, in the given order.

    Raises:
        InputError: A latent id out of range, a model of another width than the crosscoder, or a store without
            token ids.
    """
    latents = [int(j) for j in latents]
    bad = [j for j in latents if not 0 <= j < crosscoder.dict_size]
    if bad:
        raise InputError(f"latents must be ids in [0, {crosscoder.dict_size}), got {bad[:5]}")
    model, tokenizer = load_model(
        fine_tuned, "fine-tuned", width=crosscoder.d_model, device="cpu" if device is None else device
    )
    rows = crosscoder.W_dec.detach()[latents, chat].float()
    logits = lens.logit_lens(model, rows)
    best = logits.topk(min(top, logits.shape[1]), dim=1).indices.tolist()
    found = latent_examples.max_activating_examples(crosscoder, store, latents, n=n_contexts, quantiles=())
    return [
        LatentReadout(
            j,
            tokenizer.convert_ids_to_tokens(best[i]),
            [tokenizer.decode(example.tokens) for example in found[j].top],
        )
        for i, j in enumerate(latents)
    ]
