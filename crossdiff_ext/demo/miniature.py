"""The paper's finding in miniature (`crossdiff miniature`): on a planted dictionary with known ground truth, train
an L1 and a BatchTopK crosscoder on the same data, count the latents Delta_norm calls chat-only, which of them are
artifacts of the L1 loss (Complete Shrinkage, Latent Decoupling), and whether Latent Scaling with the paper's
thresholds flags them while keeping the true chat-only concepts.

The planted dictionary (truth.planted) holds the four plain kinds plus the two built for the artifacts:
frequent_weak concepts (small, frequent, at `frequent_scale` in the base model: Complete Shrinkage's setting) and
jittered ones (the same direction in both models, the base magnitude jittered per token: Latent Decoupling's).
Directions are orthonormal, so what a crosscoder does follows from the kinds.

Each learned latent is assigned a planted concept model by model (truth.assign_latents_to_concepts: a cosine above
0.9 in every model where both live), or none ("unmatched"). An artifact is a fired latent with Delta_norm > 0.9
assigned to a concept of the kind built for that mechanism (truth.ARTIFACT_KINDS).

Everything is drawn from one seed; the JSON summary and the figure are written to `out`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Union

import torch

from .. import atomic
from ..diffing import analysis
from ..diffing.latent_scaling import latent_scaling
from ..layer import CrossCoder
from ..training import TrainConfig, train
from ..truth import ARTIFACT_KINDS, assign_latents_to_concepts, planted_dictionary

# The planted dictionary of the default run (d = 64 holds its 54 orthonormal directions).
PLANTED = dict(
    n_tokens=30000,
    d_model=64,
    n_shared=16,
    n_chat_only=6,
    n_base_only=6,
    n_weak_in_base=6,
    weak_scale=0.3,
    n_frequent_weak=10,
    frequent_rate=0.25,
    frequent_magnitude=0.5,
    frequent_scale=0.4,
    n_jittered=10,
    jittered_rate=0.1,
    jitter=0.6,
    orthogonal=True,
)
DICT_SIZE = 128
K = 6  # BatchTopK: about the mean number of concepts active per token (6.6 at the defaults)
FALSE_KINDS = ("shared", "weak_in_base", "base_only", "frequent_weak", "jittered", "unmatched")


def _count(names):
    out = {}
    for name in names:
        out[name] = out.get(name, 0) + 1
    return out


def _study(name, cc, planted, steps, lr, seed, progress, l1_coefficient, reconstruction):
    t0 = time.perf_counter()
    cfg = TrainConfig(
        steps=steps,
        batch_size=256,
        lr=lr,
        warmup_steps=100,
        decay_start=0.8,
        dead_tokens=12800,
        progress=progress,
        log_every=max(1, steps // 10),
        seed=seed,
        l1_coefficient=l1_coefficient,
        reconstruction=reconstruction,
    )
    last = train(cc, planted.x, cfg).last
    scaling = latent_scaling(cc, planted.x, batch_size=4096)
    table = analysis.latent_table(cc, scaling)
    concept = assign_latents_to_concepts(cc.W_dec, planted.directions).tolist()
    kinds = ["unmatched" if c < 0 else planted.kinds[c] for c in concept]
    fired = (scaling.activation_count > 0).tolist()
    verdict = table["class"]
    chat_only = [j for j, dn in enumerate(table["delta_norm"]) if dn > 0.9 and fired[j]]
    false_chat_only = [j for j in chat_only if kinds[j] != "chat_only"]
    artifacts = {mech: [j for j in chat_only if kinds[j] == kind] for mech, kind in ARTIFACT_KINDS.items()}
    artifact_ids = [j for ids in artifacts.values() for j in ids]
    planted_chat_only = [c for c, kind in enumerate(planted.kinds) if kind == "chat_only"]
    kept = [c for c in planted_chat_only if any(concept[j] == c and verdict[j] == "chat_specific" for j in chat_only)]
    found = [c for c in planted_chat_only if c in concept]
    weak = [j for j in range(cc.dict_size) if kinds[j] == "weak_in_base" and fired[j]]

    def r(v, n=3):
        return None if v != v else round(v, n)

    summary = dict(
        model=name,
        reconstruction=reconstruction,
        fve=round(last.get("fve", float("nan")), 4),
        l0=round(last.get("l0", float("nan")), 2),
        chat_only_by_delta_norm=len(chat_only),
        of_which_not_chat_only=len(false_chat_only),
        false_chat_only_kinds={k: sum(kinds[j] == k for j in false_chat_only) for k in FALSE_KINDS},
        latent_scaling_verdicts_on_false=_count(verdict[j] for j in false_chat_only),
        latent_scaling_verdicts_on_true=_count(verdict[j] for j in chat_only if kinds[j] == "chat_only"),
        artifacts={mech: len(ids) for mech, ids in artifacts.items()},
        artifacts_flagged=(
            r(sum(verdict[j] != "chat_specific" for j in artifact_ids) / len(artifact_ids)) if artifact_ids else None
        ),
        true_chat_only_kept=r(len(kept) / len(planted_chat_only)) if planted_chat_only else None,
        true_chat_only_found=len(found),
        weak_in_base_nu_error=[r(table["nu_error"][j]) for j in weak],
        chat_only_latents=[
            dict(
                latent=j,
                concept=concept[j],
                kind=kinds[j],
                delta_norm=r(table["delta_norm"][j]),
                nu_error=r(table["nu_error"][j]),
                nu_reconstruction=r(table["nu_reconstruction"][j]),
                verdict=verdict[j],
            )
            for j in chat_only
        ],
        seconds=round(time.perf_counter() - t0, 1),
    )
    return summary, table, kinds


COLOURS = {
    "chat_only": "#d62728",
    "frequent_weak": "#9467bd",
    "jittered": "#ff7f0e",
    "shared": "#1f77b4",
    "weak_in_base": "#8c564b",
    "base_only": "#2ca02c",
    "unmatched": "#7f7f7f",
}


def _figure(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), sharex=True, sharey=True)
    for ax, (summary, table, kinds) in zip(axes, results):
        for kind, colour in COLOURS.items():
            pts = [
                (table["nu_error"][j], table["nu_reconstruction"][j])
                for j in range(len(kinds))
                if kinds[j] == kind
                and table["delta_norm"][j] > 0.9
                and table["nu_error"][j] == table["nu_error"][j]
                and table["nu_reconstruction"][j] == table["nu_reconstruction"][j]
            ]
            if pts:
                ax.scatter(*zip(*pts), s=22, color=colour, label=f"planted {kind} ({len(pts)})", alpha=0.85)
        ax.axvline(0.2, color="#444", lw=0.8, ls="--")
        ax.axhline(0.5, color="#444", lw=0.8, ls="--")
        art = summary["artifacts"]
        flagged = summary["artifacts_flagged"]
        ax.set_title(
            f"{summary['model']}: {summary['chat_only_by_delta_norm']} latents with Delta_norm > 0.9\n"
            f"artifacts: {art['complete_shrinkage']} shrinkage, {art['latent_decoupling']} decoupling"
            + (f", {flagged:.0%} flagged" if flagged is not None else ""),
            fontsize=9,
        )
        ax.set_xlabel("nu_error")
        ax.legend(fontsize=7, loc="center left")
    axes[0].set_ylabel("nu_reconstruction")
    fig.suptitle(
        "Delta_norm chat-only latents by Latent Scaling, coloured by the planted concept they recovered "
        "(dashed: the paper's thresholds)",
        fontsize=9,
        y=1.03,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(
    out: Union[str, os.PathLike],
    *,
    steps: int = 3000,
    lr: float = 1e-3,
    seed: int = 0,
    l1_coefficient: float = 0.15,
    l1_reconstruction: str = "squared",
    progress: bool = True,
    planted_overrides: Optional[dict[str, Any]] = None,
    dict_size: Optional[int] = None,
    k: Optional[int] = None,
    init: str = "independent",
) -> dict[str, Any]:
    """Train both crosscoders on one planted dictionary, write summary.json (and miniature.png where matplotlib
    is installed) under `out`; returns the summary.

    Args:
        out: Output directory.
        steps: Training steps of each crosscoder.
        lr: Adam's learning rate for both.
        seed: Seed of the data, the init and the data order.
        l1_coefficient: mu of the L1 crosscoder.
        l1_reconstruction: The L1 crosscoder's reconstruction loss, "squared" (the paper's L1 runs) or "l2";
            BatchTopK always trains on the unsquared "l2" (the reference default).
        progress: Show progress bars.
        planted_overrides: Arguments of truth.planted_dictionary that replace those of PLANTED.
        dict_size: F of both crosscoders (None: DICT_SIZE).
        k: BatchTopK's k (None: K).
        init: The crosscoders' init, "independent" (each model's rows drawn apart, the paper's) or "shared".

    Returns:
        The summary: {"planted": the settings, "results": one dict per crosscoder}.
    """
    dict_size = DICT_SIZE if dict_size is None else dict_size
    k = K if k is None else k
    settings = dict(PLANTED, seed=seed, **(planted_overrides or {}))
    planted = planted_dictionary(**settings)
    results = []
    t0 = time.perf_counter()
    for name, activation, reconstruction in (("L1", "relu", l1_reconstruction), ("BatchTopK", "batch_topk", "l2")):
        torch.manual_seed(seed)
        cc = CrossCoder(
            settings["d_model"],
            dict_size,
            2,
            k=k if activation == "batch_topk" else None,
            activation=activation,
            threshold_start_step=100,
            init=init,
        )
        results.append(_study(name, cc, planted, steps, lr, seed, progress, l1_coefficient, reconstruction))
    os.makedirs(out, exist_ok=True)
    summary = dict(
        planted=dict(
            settings,
            dict_size=dict_size,
            k=k,
            init=init,
            steps=steps,
            lr=lr,
            l1_coefficient=l1_coefficient,
            l1_reconstruction=l1_reconstruction,
        ),
        results=[r[0] for r in results],
        seconds=round(time.perf_counter() - t0, 1),
    )
    atomic.write_json(os.path.join(out, "summary.json"), summary, indent=2)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return summary
    _figure(os.path.join(out, "miniature.png"), results)
    return summary
