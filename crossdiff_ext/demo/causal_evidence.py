"""The demo's causal evidence: the paper's patching experiment on the demo pair, and a check of the attribution
score against exact single-latent patching."""

from typing import Any, Optional

import torch

from ..diffing import causal
from ..diffing.latent_scaling import LatentScalingResult
from ..layer import CrossCoder
from . import toy_language as tl

REPORTED = ("none", "all", "delta_norm_better", "delta_norm_worse", "latent_scaling_better", "latent_scaling_worse")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by position)."""
    ranks = [torch.argsort(torch.argsort(x.double(), stable=True)).double() for x in (a, b)]
    x, y = (r - r.mean() for r in ranks)
    return float((x * y).sum() / (x.norm() * y.norm()))


def causal_evidence(
    base: Any,
    chat: Any,
    crosscoder: CrossCoder,
    layer: int,
    scaling: LatentScalingResult,
    *,
    conversations: int = 200,
    seed: int = 0,
    device: Optional[str] = None,
    check_latents: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Patch the paper's latent sets into the base activations of held-out conversations, score every latent by
    attribution, and compare that score with exact single-latent patching on a sample of latents.

    Args:
        base: The base model (directory or (model, tokenizer)).
        chat: The chat model, likewise.
        crosscoder: The trained crosscoder of layer `layer`.
        layer: The crosscoder's layer.
        scaling: Latent Scaling of every latent (both targets).
        conversations: Held-out conversations patched.
        seed: Seed of the conversations (drawn apart from the training corpus).
        device: Where the models run.
        check_latents: Latents patched one by one to check attribution: half the largest |score|, half drawn
            from the other latents that fired.
        progress: Show progress bars.

    Returns:
        {"kl": PatchResult.to_json()["kl"], "layer", "variant", "set_sizes", "attribution_spearman",
        "attribution_checked"}, or
        {"skipped": why} when the crosscoder has too few chat-leaning latents with a valid nu for the sets.
    """
    try:
        sets = causal.paper_latent_sets(crosscoder, scaling)
    except ValueError as err:
        return {"skipped": str(err)}
    docs = tl.corpus(0, conversations, seed=20_000 + seed)
    options = dict(device=device, batch_size=16)
    result = causal.patch_kl(base, chat, crosscoder, layer, docs, sets, progress=progress, **options)
    score = causal.attribution(base, chat, crosscoder, layer, docs, **options)
    fired = (scaling.activation_count > 0).nonzero().squeeze(1)
    by_size = fired[torch.argsort(score[fired].abs(), descending=True, stable=True)]
    top = by_size[: check_latents // 2]
    rest = by_size[check_latents // 2 :]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[: check_latents - len(top)]
    sample = torch.cat([top, rest[pick]]).tolist()
    exact = causal.patch_kl(
        base, chat, crosscoder, layer, docs, {f"latent_{j}": [j] for j in sample}, progress=False, **options
    )
    none_mean, _, n = exact.kl["none"]["all"]
    change = torch.tensor([(exact.kl[f"latent_{j}"]["all"][0] - none_mean) * n for j in sample])
    return dict(
        kl=result.to_json()["kl"],
        layer=result.layer,
        variant=result.variant,
        set_sizes=result.set_sizes,
        attribution_spearman=spearman(score[sample], change),
        attribution_checked=len(sample),
        conversations=conversations,
    )


def describe_causal(name: str, evidence: dict[str, Any]) -> list[str]:
    """The lines the demo prints for one crosscoder's causal evidence."""
    if "skipped" in evidence:
        return [f"{name}: causal patching skipped: {evidence['skipped']}"]
    kl = evidence["kl"]
    lines = [
        f"{name}: KL(P_chat || P_patched) on {evidence['conversations']} held-out conversations, patched into the "
        "base activations (mean +- 95% half-width over positions predicting assistant tokens)",
        f"  {'set':<22} {'latents':>7} {'all':>17} {'first 10':>17} {'rest':>17}",
    ]
    for set_name in REPORTED + ("random",):
        if set_name not in kl:
            continue
        cells = []
        for subset in ("all", "first_k", "rest"):
            entry = kl[set_name].get(subset, {})
            mean, ci = entry.get("mean"), entry.get("ci95")
            cells.append(f"{mean:.4f} +- {ci:.4f}" if mean is not None and ci is not None else "-")
        size = evidence["set_sizes"].get(set_name, "")
        lines.append(f"  {set_name:<22} {size!s:>7} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17}")
    lines.append(
        f"  attribution vs exact single-latent patching: Spearman {evidence['attribution_spearman']:.2f} over "
        f"{evidence['attribution_checked']} latents"
    )
    return lines
