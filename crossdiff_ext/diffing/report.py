"""`crossdiff report`: one self-contained HTML page about a crosscoder's latents (plots embedded as PNG).

Sections: the Delta_norm histogram with the paper's bands; nu_error vs nu_reconstruction of the chat-only latents
coloured by Latent Scaling's verdict; the histogram of decoder cosines; the latent classes; with a causal patching
result (diffing/causal.py), the KL of every latent set as bars with 95% intervals; with the run's log records, its
training curves (diffing/curves.py); and the most fine-tuned-specific latents with their max-activating contexts
(identical contexts once, with their count; and causal score, when attribution was run); for a store collected
from a mixture, optionally those latents' firing split by source. The page needs no network and no script.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

from .. import atomic
from ..data.store import ActivationStore
from ..errors import InputError
from ..layer.crosscoder import CrossCoder
from .analysis import latent_table, write_table
from .by_source import add_source_columns, check_sources, firing_by_source
from .curves import curve_figures
from .examples import LatentExamples, max_activating_examples
from .latent_scaling import LatentScalingResult, latent_scaling

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

COLOURS = {
    "chat_specific": "#d62728",
    "complete_shrinkage": "#1f77b4",
    "latent_decoupling": "#2ca02c",
    "shrinkage_and_decoupling": "#9467bd",
    "never_fired": "#7f7f7f",
}


def _png(fig):
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(table):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(table["delta_norm"], bins=50, range=(0, 1), color="#555555")
    for edge in (0.1, 0.4, 0.6, 0.9):
        ax.axvline(edge, color="#d62728", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("Delta_norm (0 = base-only, 0.5 = shared, 1 = chat-only)")
    ax.set_ylabel("latents")
    figs["delta_norm"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    # Clipped: a rounded cosine of 1.0000001 would fall outside the histogram's range and vanish.
    cosines = [min(1.0, max(-1.0, c)) for c in table["decoder_cosine"] if not math.isnan(c)]
    ax.hist(cosines, bins=50, range=(-1, 1), color="#555555")
    ax.set_yscale("log")
    ax.set_xlabel("cosine of the base and chat decoder rows")
    ax.set_ylabel("latents")
    figs["cosine"] = _png(fig)

    if "nu_error" in table:
        fig, ax = plt.subplots(figsize=(5.2, 4.4))
        for verdict, colour in COLOURS.items():
            pts = [
                (e, r)
                for e, r, c in zip(table["nu_error"], table["nu_reconstruction"], table["class"])
                if c == verdict and not (math.isnan(e) or math.isnan(r))
            ]
            if pts:
                ax.scatter(*zip(*pts), s=10, color=colour, label=f"{verdict} ({len(pts)})", alpha=0.8)
        ax.axvline(0.2, color="#444", lw=0.8, ls="--")
        ax.axhline(0.5, color="#444", lw=0.8, ls="--")
        ax.set_xlabel("nu_error (base / chat)")
        ax.set_ylabel("nu_reconstruction (base / chat)")
        ax.set_title("chat-only latents (Delta_norm > 0.9)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        figs["nu"] = _png(fig)
    return figs


def kl_figure(kl: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Bars of the mean KL(P_chat || P_patched) per latent set and position subset, with 95% intervals, as a
    base64 PNG. kl: the "kl" entry of PatchResult.to_json() (or of causal.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in kl if not n.startswith("random_")]  # the random sets appear pooled as "random"
    subsets = [s for s in ("all", "first_k", "rest") if any(s in kl[n] for n in names)]
    width = 0.8 / len(subsets)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 1.5), 3.4))
    for i, subset in enumerate(subsets):
        means = [kl[n].get(subset, {}).get("mean") for n in names]
        errors = [kl[n].get(subset, {}).get("ci95") for n in names]
        xs = [x + (i - (len(subsets) - 1) / 2) * width for x in range(len(names))]
        ax.bar(
            xs,
            [m if m is not None else 0.0 for m in means],
            width,
            yerr=[e if e is not None else 0.0 for e in errors],
            capsize=2,
            label=subset,
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("KL(P_chat || P_patched)")
    if len(subsets) > 1:
        ax.legend(fontsize=7, title="positions", title_fontsize=7)
    return _png(fig)


def _context_html(example, tokenizer):
    if tokenizer is None:  # token ids only
        parts = [f"[{token}]" for token in example.tokens]
        parts[example.focus] = f'<span class="focus">{parts[example.focus]}</span>'
        return "".join(parts)
    before, token, after = (html.escape(t).replace("\n", "\u21b5") for t in example.text(tokenizer))
    return f'{before}<span class="focus">{token}</span>{after}'


def render(
    table: Mapping[str, Sequence[Any]],
    *,
    title: str = "crosscoder report",
    examples: Optional[Mapping[int, LatentExamples]] = None,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    top: int = 20,
    meta: Optional[Mapping[str, Any]] = None,
    causal: Optional[Mapping[str, Any]] = None,
    sources: Optional[Sequence[str]] = None,
    curves: Optional[Sequence[Mapping[str, Any]]] = None,
) -> str:
    """The report as an HTML string. table: cx.latent_table (with Latent Scaling for the nu plot; a
    "causal_score" column is shown when present); examples: {latent: LatentExamples} for the latents to show;
    tokenizer: turns token ids into text (ids otherwise); causal: a PatchResult.to_json() dict (causal.json);
    sources: the source labels of the table's freq[...] / share[...] columns (by_source.add_source_columns), to
    show the listed latents' firing by source; curves: the training run's log records (cx.read_log), drawn as its
    training curves."""
    out = _head_html(title, meta)
    out += _classes_html(table)
    out += _figures_html(_figures(table), causal)
    out += _curves_html(curves)
    if sources:
        out += _by_source_html(table, fine_tuned_latents(table, top), sources)
    out += _top_latents_html(table, fine_tuned_latents(table, top), examples, tokenizer)
    out.append("</table></body></html>")
    return "\n".join(out)


def _head_html(title, meta):
    """The page's head, title and the run's metadata line."""
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
        ".focus{background:#ffb347;font-weight:bold}.ctx{font-family:monospace;font-size:12px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if meta:
        out.append(
            "<p>" + "; ".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}" for k, v in meta.items()) + "</p>"
        )
    return out


def _classes_html(table):
    """The table of latent classes, most frequent first, with their share of the latents."""
    classes = {}
    for c in table["class"]:
        classes[c] = classes.get(c, 0) + 1
    out = ["<h2>Latent classes</h2><table><tr><th>class</th><th>latents</th><th>share</th></tr>"]
    for name, count in sorted(classes.items(), key=lambda kv: -kv[1]):
        out.append(f"<tr><td>{html.escape(name)}</td><td>{count}</td><td>{count / len(table['latent']):.1%}</td></tr>")
    out.append("</table>")
    return out + _partition_html(table)


def _has_dedicated(table):
    """Whether the table's crosscoder has dedicated latents (a partition column with other than "shared")."""
    return any(p != "shared" for p in table.get("partition", ()))


def _partition_html(table):
    """With dedicated latents: how many latents each part of the partition holds, by class."""
    if not _has_dedicated(table):
        return []
    counts = {}
    for part, c in zip(table["partition"], table["class"]):
        counts.setdefault(part, {}).setdefault(c, 0)
        counts[part][c] += 1
    out = [
        "<h2>Dedicated latents</h2><p>The crosscoder was trained with a partition: dedicated latents have encoder "
        "and decoder rows for one model only (the other model's are zero), the rest are shared. Classes as above "
        "(a chat-dedicated latent has Delta_norm 1; Latent Scaling with the chat probe leaves base-dedicated "
        "latents unscored).</p><table><tr><th>partition</th><th>latents</th><th>classes</th></tr>"
    ]
    for part, by_class in sorted(counts.items()):
        detail = ", ".join(f"{html.escape(c)}: {n}" for c, n in sorted(by_class.items(), key=lambda kv: -kv[1]))
        out.append(f"<tr><td>{html.escape(part)}</td><td>{sum(by_class.values())}</td><td>{detail}</td></tr>")
    out.append("</table>")
    return out


def _figures_html(figs, causal):
    """The figures with their captions: Delta_norm, the nu scatter when scaled, the cosines, the causal KL."""
    out = [
        "<h2>Delta_norm</h2><p>Relative decoder norm difference; dashed lines: the paper's bands (base-only "
        "&lt; 0.1, shared 0.4-0.6, chat-only &gt; 0.9).</p>"
        f"<img alt='Delta_norm histogram' src='data:image/png;base64,{figs['delta_norm']}'>"
    ]
    if "nu" in figs:
        out.append(
            "<h2>Latent Scaling</h2><p>nu = beta(base) / beta(chat) per chat-only latent. Low nu_error and "
            "nu_reconstruction (bottom-left box: nu_error &lt; 0.2, nu_reconstruction &lt; 0.5): genuinely "
            "chat-specific. High nu_error: Complete Shrinkage; high nu_reconstruction: Latent "
            "Decoupling.</p>"
            f"<img alt='nu scatter' src='data:image/png;base64,{figs['nu']}'>"
        )
    out.append(f"<h2>Decoder cosine</h2><img alt='cosine histogram' src='data:image/png;base64,{figs['cosine']}'>")
    if causal is not None:
        out.append(
            "<h2>Causal patching</h2><p>KL(P_chat || P_patched) of the chat model with the latent set patched into "
            "the base model's activations at block "
            f"{html.escape(str(causal.get('layer')))} (variant {html.escape(str(causal.get('variant')))}): "
            "<i>none</i> feeds the base activations unedited, <i>all</i> the base reconstruction error plus the "
            "chat reconstruction; lower is closer to the chat model. Bars: mean over the scored positions, "
            f"whiskers: 95% intervals.</p><img alt='KL per latent set' src='data:image/png;base64,"
            f"{kl_figure(causal['kl'])}'>"
        )
    return out


def _by_source_html(table, ranked, sources):
    """The listed latents' firing frequency on each source's tokens and the share of their firing per source."""
    out = [
        "<h2>Firing by source</h2><p>Per source of the store's tokens: how often each listed latent fires on that "
        "source's tokens (freq), and which share of its firing tokens come from it (share). A chat-specific "
        "latent should fire mostly on the chat source.</p><table><tr><th>latent</th>"
        + "".join(f"<th>freq {html.escape(s)}</th>" for s in sources)
        + "".join(f"<th>share {html.escape(s)}</th>" for s in sources)
        + "</tr>"
    ]
    for j in ranked:
        cells = [f"{table[f'freq[{s}]'][j]:.2e}" for s in sources]
        cells += [f"{table[f'share[{s}]'][j]:.1%}" if not math.isnan(table[f"share[{s}]"][j]) else "-" for s in sources]
        out.append(f"<tr><td>{j}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _example_line(example, tokenizer):
    """One max-activating context: its activation, its text, how many firing tokens share it, its source."""
    repeats = f" <b>&times;{example.count}</b>" if example.count > 1 else ""
    where = f" <i>({html.escape(example.source)}, document {example.document})</i>" if example.source else ""
    return f"<span class='ctx'>{example.activation:.3g}: {_context_html(example, tokenizer)}</span>{repeats}{where}"


def _curves_html(records):
    """The training curves of the run's log records, one image per quantity (nothing without records)."""
    if not records:
        return []
    out = [
        "<h2>Training curves</h2><p>From the run's log "
        f"({len(records)} records, steps {records[0]['step']} to {records[-1]['step']}): the loss and its terms, "
        "FVE overall and per model, L0, the fraction of dead latents, the inference threshold, the learning rate "
        "and the gradient norm, as logged every log_every steps. The loss terms are drawn unweighted: the loss is "
        "reconstruction + aux_alpha * aux (BatchTopK) or + l1_coefficient * l1 (L1).</p>"
    ]
    for name, fig in curve_figures(records).items():
        out.append(f"<img alt='training curve: {name}' src='data:image/png;base64,{_png(fig)}'>")
    return out


def _top_latents_html(table, ranked, examples, tokenizer):
    """The table of the ranked latents (left open), with their max-activating contexts when given."""
    F = len(table["latent"])
    dedicated = _has_dedicated(table)
    out = [
        "<h2>Top fine-tuned-specific latents</h2><table><tr><th>latent</th>"
        + ("<th>partition</th>" if dedicated else "")
        + "<th>Delta_norm</th>"
        "<th>cosine</th><th>nu_error</th><th>nu_recon</th><th>freq</th>"
        + ("<th>causal score</th>" if "causal_score" in table else "")
        + "<th>max-activating contexts</th></tr>"
    ]
    for j in ranked:
        nu_e = table.get("nu_error", [math.nan] * F)[j]
        nu_r = table.get("nu_reconstruction", [math.nan] * F)[j]
        freq = table.get("firing_frequency", [math.nan] * F)[j]
        ctx = ""
        if examples and j in examples:
            ctx = "<br>".join(_example_line(e, tokenizer) for e in examples[j].top[:5])
        out.append(
            f"<tr><td>{j}</td>"
            + (f"<td>{html.escape(table['partition'][j])}</td>" if dedicated else "")
            + f"<td>{table['delta_norm'][j]:.3f}</td><td>{table['decoder_cosine'][j]:.3f}</td>"
            f"<td>{nu_e:.3f}</td><td>{nu_r:.3f}</td><td>{freq:.2e}</td>"
            + (f"<td>{table['causal_score'][j]:.3g}</td>" if "causal_score" in table else "")
            + f"<td>{ctx}</td></tr>"
        )
    return out


def write_report(path: Union[str, os.PathLike], table: Mapping[str, Sequence[Any]], **kwargs: Any) -> str:
    """render(...) written to `path` atomically."""
    return atomic.write_text(os.fspath(path), render(table, **kwargs))


def fine_tuned_latents(table: Mapping[str, Sequence[Any]], top: int = 20) -> list[int]:
    """The latent ids the report lists: chat-specific (or, without Latent Scaling, chat-only) latents, lowest
    nu_error first."""
    ranked = [j for j, c in enumerate(table["class"]) if c in ("chat_specific", "chat_only")]
    if "nu_error" in table:
        ranked.sort(key=lambda j: (table["nu_error"][j], -table["delta_norm"][j]))
    else:
        ranked.sort(key=lambda j: -table["delta_norm"][j])
    return ranked[:top]


def scaled_table(
    cc: CrossCoder,
    stores: Sequence[ActivationStore],
    *,
    probe: Union[str, int] = "chat",
    batch_size: int = 4096,
    progress: bool = False,
) -> tuple[LatentScalingResult, dict[str, list[Any]]]:
    """Latent Scaling of every latent over the stores (one after the other), and the latent table."""
    data = (
        stores[0]
        if len(stores) == 1
        else itertools.chain.from_iterable(
            (s[i : i + batch_size] for i in range(0, len(s), batch_size)) for s in stores
        )
    )
    scaling = latent_scaling(cc, data, probe=probe, batch_size=batch_size, progress=progress)
    return scaling, latent_table(cc, scaling)


def report_crosscoder(
    cc: CrossCoder,
    stores: Sequence[ActivationStore],
    out: Union[str, os.PathLike],
    *,
    probe: Union[str, int] = "chat",
    top: int = 20,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    title: str = "crosscoder report",
    meta: Optional[Mapping[str, Any]] = None,
    batch_size: int = 4096,
    progress: bool = False,
    causal: Optional[Mapping[str, Any]] = None,
    by_source: bool = False,
    curves: Optional[Sequence[Mapping[str, Any]]] = None,
    scaling: Optional[LatentScalingResult] = None,
) -> tuple[LatentScalingResult, dict[str, list[Any]], str, list[int], Optional[dict[int, LatentExamples]]]:
    """What `crossdiff report` does: Latent Scaling over the stores, the latent table beside `out` (.csv), the
    max-activating examples of the `top` fine-tuned-specific latents (from the first store, when it holds token
    ids), and the HTML page at `out`; with `causal` (a causal.json dict) its KL chart, and its "attribution"
    as the table's causal_score column; with `curves` (the run's log records) its training curves; with
    `by_source`, each latent's firing per source of the stores' tokens (by_source.firing_by_source: freq[...] and
    share[...] columns, and a section of the page). `scaling`: Latent Scaling of these stores already run (e.g. to
    choose the causal latent sets first), used instead of running it again. Returns (scaling, table, table_path,
    chosen latents, examples)."""
    if by_source:
        check_sources(stores)
    if scaling is None:
        scaling, table = scaled_table(cc, stores, probe=probe, batch_size=batch_size, progress=progress)
    else:
        table = latent_table(cc, scaling)
    sources = add_source_columns(table, firing_by_source(cc, stores, batch_size=batch_size)) if by_source else None
    if causal is not None and causal.get("attribution") is not None:
        if len(causal["attribution"]) != cc.dict_size:
            raise InputError(
                f"the causal result scores {len(causal['attribution'])} latents, the crosscoder has {cc.dict_size}"
            )
        table["causal_score"] = list(causal["attribution"])
    table_path = os.path.splitext(os.fspath(out))[0] + ".csv"
    write_table(table, table_path)
    chosen = fine_tuned_latents(table, top)
    found = None
    if stores[0].token_ids() is not None and stores[0].positions() is not None:
        found = max_activating_examples(cc, stores[0], chosen, batch_size=batch_size, progress=progress)
    meta = dict(
        dict(tokens=scaling.tokens, latents=cc.dict_size, activation=cc.activation, probe=probe),
        **({"partition": list(cc.partition)} if cc.partition is not None else {}),
        **(meta or {}),
    )
    write_report(
        out,
        table,
        title=title,
        examples=found,
        tokenizer=tokenizer,
        top=top,
        meta=meta,
        causal=causal,
        sources=sources,
        curves=curves,
    )
    return scaling, table, table_path, chosen, found
