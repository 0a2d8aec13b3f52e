"""The paper's finding in miniature (`crossdiff miniature`): on a planted dictionary with known ground truth,
train an L1 and a BatchTopK crosscoder, count the latents Delta_norm calls chat-only and how many of them really
are, and show how Latent Scaling separates the artifacts (weak-in-base concepts must come out with nu_error
near their planted base/chat ratio).

A learned latent is matched to the planted concept whose concatenated decoder direction is most similar
(cosine > 0.9, else "unmatched"). Everything is drawn from one seed; the JSON summary and figures are written
to --out.
"""

from __future__ import annotations

import os
import time
from typing import Any, Union

import torch

from .. import atomic
from ..diffing import analysis
from ..diffing.latent_scaling import latent_scaling
from ..layer import CrossCoder
from ..training import TrainConfig, train
from . import synthetic

WEAK_SCALE = 0.3


def _concept_of_latents(W_dec, directions, min_cosine=0.9):
    learned = torch.nn.functional.normalize(W_dec.detach().float().reshape(W_dec.shape[0], -1), dim=1)
    truth = torch.nn.functional.normalize(directions.float().reshape(directions.shape[0], -1), dim=1)
    cos = learned @ truth.T  # [F, C]
    best = cos.max(dim=1)
    return torch.where(best.values > min_cosine, best.indices, torch.full_like(best.indices, -1)), best.values


def _study(name, cc, planted, steps, seed, progress, l1_coefficient):
    t0 = time.perf_counter()
    cfg = TrainConfig(
        steps=steps,
        batch_size=256,
        lr=1e-3,
        warmup_steps=100,
        decay_start=0.8,
        dead_tokens=12800,
        progress=progress,
        log_every=max(1, steps // 10),
        seed=seed,
        l1_coefficient=l1_coefficient,
    )
    last = train(cc, planted.x, cfg).last
    scaling = latent_scaling(cc, planted.x, batch_size=4096)
    table = analysis.latent_table(cc, scaling)
    concept, _ = _concept_of_latents(cc.W_dec, planted.directions)
    kinds = ["unmatched" if c < 0 else planted.kinds[c] for c in concept.tolist()]
    fired = scaling.activation_count > 0
    chat_only = [j for j, dn in enumerate(table["delta_norm"]) if dn > 0.9 and bool(fired[j])]
    false_chat_only = [j for j in chat_only if kinds[j] != "chat_only"]
    verdicts = {}
    for j in false_chat_only:
        verdicts[table["class"][j]] = verdicts.get(table["class"][j], 0) + 1
    true_verdicts = {}
    for j in chat_only:
        if kinds[j] == "chat_only":
            true_verdicts[table["class"][j]] = true_verdicts.get(table["class"][j], 0) + 1
    weak = [j for j in range(cc.dict_size) if kinds[j] == "weak_in_base" and bool(fired[j])]
    nu_weak = [round(table["nu_error"][j], 3) for j in weak]
    return (
        dict(
            model=name,
            fve=round(last.get("fve", float("nan")), 4),
            l0=round(last.get("l0", float("nan")), 2),
            chat_only_by_delta_norm=len(chat_only),
            of_which_not_chat_only=len(false_chat_only),
            false_chat_only_kinds={
                k: sum(kinds[j] == k for j in false_chat_only)
                for k in ("shared", "weak_in_base", "base_only", "unmatched")
            },
            latent_scaling_verdicts_on_false=verdicts,
            latent_scaling_verdicts_on_true=true_verdicts,
            weak_in_base_nu_error=nu_weak,
            seconds=round(time.perf_counter() - t0, 1),
        ),
        table,
        kinds,
    )


def _figure(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    colours = {
        "chat_only": "#d62728",
        "shared": "#1f77b4",
        "weak_in_base": "#ff7f0e",
        "base_only": "#2ca02c",
        "unmatched": "#7f7f7f",
    }
    for ax, (summary, table, kinds) in zip(axes, results):
        for kind, colour in colours.items():
            pts = [
                (table["nu_error"][j], table["nu_reconstruction"][j])
                for j in range(len(kinds))
                if kinds[j] == kind and table["delta_norm"][j] > 0.9 and table["nu_error"][j] == table["nu_error"][j]
            ]
            if pts:
                ax.scatter(*zip(*pts), s=18, color=colour, label=f"planted {kind} ({len(pts)})", alpha=0.85)
        ax.axvline(0.2, color="#444", lw=0.8, ls="--")
        ax.axhline(0.5, color="#444", lw=0.8, ls="--")
        ax.set_title(
            f"{summary['model']}: {summary['chat_only_by_delta_norm']} 'chat-only' latents, "
            f"{summary['of_which_not_chat_only']} not",
            fontsize=10,
        )
        ax.set_xlabel("nu_error")
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("nu_reconstruction")
    fig.suptitle("Latents with Delta_norm > 0.9, coloured by the planted concept they recovered", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(
    out: Union[str, os.PathLike],
    *,
    steps: int = 3000,
    seed: int = 0,
    l1_coefficient: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train both crosscoders, write summary.json and miniature.png under `out`; returns the summary."""
    planted = synthetic.planted_dictionary(
        n_tokens=30000,
        d_model=64,
        n_shared=16,
        n_chat_only=6,
        n_base_only=6,
        n_weak_in_base=6,
        weak_scale=WEAK_SCALE,
        seed=seed,
    )
    results = []
    for name, activation in (("L1", "relu"), ("BatchTopK", "batch_topk")):
        torch.manual_seed(seed)
        cc = CrossCoder(
            64, 96, 2, k=3 if activation == "batch_topk" else None, activation=activation, threshold_start_step=100
        )
        results.append(_study(name, cc, planted, steps, seed, progress, l1_coefficient))
    os.makedirs(out, exist_ok=True)
    summary = dict(
        planted=dict(
            shared=16,
            chat_only=6,
            base_only=6,
            weak_in_base=6,
            weak_scale=WEAK_SCALE,
            d_model=64,
            dict_size=96,
            tokens=30000,
            steps=steps,
            seed=seed,
            l1_coefficient=l1_coefficient,
        ),
        results=[r[0] for r in results],
    )
    atomic.write_json(os.path.join(out, "summary.json"), summary, indent=2)
    _figure(os.path.join(out, "miniature.png"), results)
    return summary
