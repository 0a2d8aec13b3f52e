"""`crossdiff demo`: the whole model-diffing job on a base/chat pair, end to end.

1. the model pair: the tiny Llama pair of toy_models that ships with the package (base: plain text; chat:
   fine-tuned on chat with a template and planted refusal and correction behaviours; rebuilt from its recipe on
   request), or real models given by name;
2. paired activations of one layer over a fresh generated corpus, half plain text, half chat -> a store;
3. a BatchTopK and an L1 crosscoder trained on it (inputs normalised, as in the paper);
4. Latent Scaling of every latent, the paper's causal patching experiment, the latent table, and the HTML report
   of each crosscoder (with its training curves and the patching chart);
5. what the paper measures, side by side: how many latents Delta_norm calls chat-only, how many of those Latent
   Scaling confirms as chat-specific or flags as Complete Shrinkage / Latent Decoupling, and how many of the
   chat-specific ones fire mainly on chat-template tokens (most of their 20 max-activating examples are template
   tokens). Written to OUT/summary.json.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .. import atomic, training
from ..data.activations import collect, template_token_ids
from ..data.store import ActivationStore
from ..diffing.examples import max_activating_examples, token_share
from ..diffing.latent_scaling import inference_pass
from ..diffing.report import report_crosscoder, scaled_table
from ..errors import InputError
from ..layer import CrossCoder
from ..training import TrainConfig, read_log
from . import toy_language as tl
from .causal_evidence import causal_evidence, describe_causal
from .toy_models import fixed_threads, shipped_pair, toy_pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class DemoConfig:
    """The settings of `crossdiff demo` (each is a command-line option)."""

    out: str = "crossdiff_demo"
    base: Optional[str] = None  # None: the embedded toy pair
    chat: Optional[str] = None
    layer: Optional[int] = None  # default: the middle layer
    text_documents: int = 1200
    chat_documents: int = 1200
    max_tokens: Optional[int] = None
    context_length: int = 96
    dict_size: Optional[int] = None  # default: 8 * d_model
    k: Optional[int] = None  # default: max(8, d_model // 24)
    steps: int = 2500
    batch_size: int = 512
    l1_coefficient: float = 0.041  # the paper's mu (docs/math.md), with the paper's input normalisation
    seed: int = 0
    device: Optional[str] = None
    progress: bool = True
    causal_conversations: int = 200  # held-out conversations of the patching experiment (0: none)
    # torch threads of the whole run (None: torch's default). Fixed, so the printed table is the same on machines
    # with different core counts: the rounding of GEMMs and reductions depends on the thread count.
    threads: Optional[int] = 1
    # Build the toy pair from its recipe on this machine (cached) instead of loading the shipped one: minutes.
    rebuild_pair: bool = False

    def validate(self) -> None:
        """Refuse inconsistent settings (a half-given model pair, a missing --layer, non-positive sizes)."""
        if (self.base is None) != (self.chat is None):
            raise InputError("give both --base and --chat (real models), or neither (the embedded toy pair)")
        if self.base is not None and self.rebuild_pair:
            raise InputError("--rebuild-pair rebuilds the embedded toy pair: not with --base/--chat")
        if self.base is not None and self.layer is None:
            raise InputError("--layer is required with --base/--chat")
        if self.causal_conversations < 0:
            raise InputError(f"causal_conversations must be >= 0, got {self.causal_conversations}")
        for name in ("text_documents", "chat_documents", "steps", "batch_size", "context_length"):
            if getattr(self, name) < 0 or (
                name not in ("text_documents", "chat_documents") and getattr(self, name) < 1
            ):
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.text_documents + self.chat_documents < 1:
            raise InputError("text_documents + chat_documents must be at least 1")
        if self.k is not None and self.dict_size is not None and not 1 <= self.k <= self.dict_size:
            raise InputError(f"k must be in [1, dict_size = {self.dict_size}], got {self.k}")


def _clear(directory, owned):
    """Remove a previous run's output directory, if everything in it is something the demo writes (names matching
    `owned`); refuse otherwise, so a mistyped --out never deletes a user's files."""
    if not os.path.exists(directory):
        return
    strangers = [n for n in os.listdir(directory) if not any(fnmatch.fnmatch(n, p) for p in owned)]
    if strangers or not os.path.isdir(directory):
        raise InputError(
            f"{directory} holds files the demo did not write ({strangers[:3]}); move it or choose another --out"
        )
    shutil.rmtree(directory)


def _verdicts(table, on_template):
    """The paper's numbers for one crosscoder from its latent table; on_template: {latent: bool} for the
    chat-specific latents (does it fire mainly on chat-template tokens)."""
    classes = table["class"]
    chat_only = [j for j, c in enumerate(classes) if c not in ("shared", "base_only", "other")]
    specific = [j for j in chat_only if classes[j] == "chat_specific"]
    counts = {}
    for c in classes:
        counts[c] = counts.get(c, 0) + 1
    n_on = sum(bool(on_template[j]) for j in specific)
    return dict(
        classes=counts,
        chat_only_by_delta_norm=len(chat_only),
        chat_specific=len(specific),
        not_chat_specific=len(chat_only) - len(specific),
        chat_specific_on_template=n_on,
        chat_specific_on_template_share=round(n_on / len(specific), 3) if specific else None,
    )


def describe_latents(
    cc: CrossCoder,
    store: ActivationStore,
    latents: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    template: Iterable[int],
    table: Mapping[str, Sequence[Any]],
    share: torch.Tensor,
    *,
    n: int = 20,
    template_majority: float = 0.5,
) -> list[dict[str, Any]]:
    """For each latent: its numbers, the tokens its n max-activating examples sit on, one context, and whether
    more than `template_majority` of those examples are chat-template tokens ("fires mainly on the template")."""
    # Every one of the n highest tokens counts, repeated contexts included: the verdict is about where the latent
    # fires, not about how varied its contexts are.
    found = max_activating_examples(cc, store, latents, n=n, quantiles=(), distinct=False)
    template = set(template)
    out = []
    for j in latents:
        top = found[j].top
        focus = [e.tokens[e.focus] for e in top]
        counts = {}
        for t in tokenizer.convert_ids_to_tokens(focus):
            counts[t] = counts.get(t, 0) + 1
        context = ""
        if top:
            before, token, after = top[0].text(tokenizer)
            context = f"{before}[{token}]{after}".strip()
        out.append(
            dict(
                latent=j,
                delta_norm=round(table["delta_norm"][j], 3),
                nu_error=round(table["nu_error"][j], 3),
                nu_reconstruction=round(table["nu_reconstruction"][j], 3),
                firing_frequency=round(table["firing_frequency"][j], 5),
                template_activation_share=round(float(share[j]), 3),
                top_tokens=dict(sorted(counts.items(), key=lambda kv: -kv[1])[:4]),
                context=context,
                on_template=bool(top) and sum(t in template for t in focus) > template_majority * len(top),
            )
        )
    return out


@torch.inference_mode()
def evaluate(cc: CrossCoder, store: ActivationStore, batch_size: int = 4096) -> dict[str, float]:
    """Inference-mode FVE (1 - sum ||x - xhat||^2 / sum ||x - mean||^2, both models pooled, in the normalised space)
    and mean L0 over the whole store."""
    err = sq = l0 = 0.0
    s1 = None
    n = 0
    with inference_pass(cc, store, batch_size) as batches:
        for x in batches:
            xn = cc.normalize(x.float())
            out = cc(xn.to(cc.input_dtype), normalized=True)
            err += float((xn - out.recon.float()).double().pow(2).sum())
            s1 = xn.double().sum(0) if s1 is None else s1 + xn.double().sum(0)
            sq += float(xn.double().pow(2).sum())
            l0 += float(out.codes.active_per_row().sum())
            n += x.shape[0]
    variance = sq - float(s1.pow(2).sum()) / n
    return dict(fve=round(1 - err / variance, 4), l0=round(l0 / n, 2))


def run(config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to OUT/summary.json)."""
    config.validate()
    with fixed_threads(config.threads):
        return _run(config)


# (name, activation) of the two crosscoders the demo compares, in the order it trains them
CROSSCODERS = (("batchtopk", "batch_topk"), ("l1", "relu"))


class _Stopwatch:
    """Seconds per phase, rounded to 0.1 s, in the order the phases end."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 1)

    def total(self) -> dict[str, float]:
        return dict(self.seconds, total=round(time.perf_counter() - self.start, 1))


def _run(config: DemoConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    clock = _Stopwatch()
    os.makedirs(config.out, exist_ok=True)
    with clock.phase("model_pair"):
        base, chat, layer, pair = _model_pair(config)
    with clock.phase("collect"):
        store = _collect(config, base, chat, layer)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    template = template_token_ids(tokenizer)
    dict_size, k = _sizes(config, store.d_model)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for name, activation in CROSSCODERS:
        with clock.phase(name):
            cc, train = _train(config, name, activation, store, dict_size, k, device)
            scaling, _ = scaled_table(cc, [store], progress=config.progress)
            evidence = _patch(config, name, cc, scaling, base, chat, layer, clock)
            table, files = _report(config, name, cc, store, tokenizer, layer, scaling, evidence)
            results[name] = _result(cc, train, store, tokenizer, template, table, files, evidence, activation)
    summary = dict(
        config=asdict(config),
        base=base,
        chat=chat,
        layer=layer,
        tokens=len(store),
        template_tokens=tokenizer.convert_ids_to_tokens(template),
        pair=pair,
        crosscoders=results,
        seconds=clock.total(),
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    atomic.write_json(os.path.join(config.out, "summary.json"), summary, indent=1)
    return summary


def _model_pair(config: DemoConfig) -> tuple[str, str, int, Optional[dict[str, Any]]]:
    """(base, chat, layer, the toy pair's record or None): the shipped toy pair (rebuilt on this machine on request),
    or the models given by name."""
    if config.base is not None:
        return config.base, config.chat, config.layer, None
    base, chat, pair = toy_pair(progress=config.progress) if config.rebuild_pair else shipped_pair()
    layer = config.layer if config.layer is not None else pair["recipe"]["layers"] // 2
    return base, chat, layer, pair


def _collect(config: DemoConfig, base: str, chat: str, layer: int) -> ActivationStore:
    """Paired activations of `layer` over a fresh generated corpus, into OUT/store (replacing a previous run's)."""
    documents = tl.corpus(config.text_documents, config.chat_documents, seed=10_000 + config.seed)
    store_dir = os.path.join(config.out, "store")
    _clear(store_dir, ["store.json", "shard-*", "positions-*", "tokens-*", "documents-*", "sources-*", ".*"])
    return collect(
        base,
        chat,
        layer,
        documents,
        store_dir,
        max_tokens=config.max_tokens,
        context_length=config.context_length,
        drop_first=1,
        dtype="float32" if config.base is None else "float16",
        device=config.device,
        progress=config.progress,
    )


def _sizes(config: DemoConfig, d_model: int) -> tuple[int, int]:
    """(dict_size, k): the given ones, else the defaults that follow the width (known once the store is written)."""
    dict_size = config.dict_size or 8 * d_model
    k = config.k or max(8, d_model // 24)
    if not 1 <= k <= dict_size:
        raise InputError(f"k = {k} must be in [1, dict_size = {dict_size}] (-k and --dict-size)")
    return dict_size, k


def _train(
    config: DemoConfig, name: str, activation: str, store: ActivationStore, dict_size: int, k: int, device: str
) -> tuple[CrossCoder, Any]:
    """A crosscoder trained on the store into OUT/<name> (inputs normalised, as in the paper), in eval mode."""
    torch.manual_seed(config.seed)
    cc = CrossCoder(
        store.d_model,
        dict_size,
        2,
        k=k if activation == "batch_topk" else None,
        activation=activation,
        device=device,
        target_rms=1.0,
        threshold_start_step=min(100, config.steps // 2),
    )
    run_dir = os.path.join(config.out, name)
    _clear(run_dir, ["step-*", "log.jsonl", "report.html", "report.csv", ".*"])
    # The L1 crosscoder as in the paper: squared error (its sparsity trade-off depends on it) and mu.
    train = training.train(
        cc,
        store,
        TrainConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            lr=1e-3,
            warmup_steps=100,
            decay_start=0.8,
            reconstruction="squared" if activation == "relu" else "l2",
            l1_coefficient=config.l1_coefficient,
            dead_tokens=50 * config.batch_size,
            seed=config.seed,
            checkpoint_dir=run_dir,
            checkpoint_every=config.steps,
            keep_checkpoints=1,
            log_every=max(1, config.steps // 10),
            progress=config.progress,
        ),
    )
    cc.eval()
    return cc, train


def _report(
    config: DemoConfig,
    name: str,
    cc: CrossCoder,
    store: ActivationStore,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    scaling: Any,
    evidence: Optional[dict[str, Any]],
) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """(latent table, {"report": path, "table": path}): the latent table and the HTML report in OUT/<name>, with
    the training curves of OUT/<name>/log.jsonl and the causal patching chart (when it ran)."""
    report = os.path.join(config.out, name, "report.html")
    causal = evidence if evidence is not None and "kl" in evidence else None  # none when skipped
    _, table, table_path, _, _ = report_crosscoder(
        cc,
        [store],
        report,
        tokenizer=tokenizer,
        title=f"crossdiff demo: {name} crosscoder, base vs chat",
        meta=dict(layer=layer, k=cc.k),
        progress=config.progress,
        causal=causal,
        curves=read_log(os.path.join(config.out, name, "log.jsonl")),
        scaling=scaling,
    )
    return table, dict(report=report, table=table_path)


def _patch(
    config: DemoConfig,
    name: str,
    cc: CrossCoder,
    scaling: Any,
    base: str,
    chat: str,
    layer: int,
    clock: _Stopwatch,
) -> Optional[dict[str, Any]]:
    """The causal patching experiment on held-out conversations (None when config.causal_conversations is 0)."""
    if not config.causal_conversations:
        return None
    with clock.phase(f"{name}_causal"):
        return causal_evidence(
            base,
            chat,
            cc,
            layer,
            scaling,
            conversations=config.causal_conversations,
            seed=config.seed,
            device=config.device,
            progress=config.progress,
        )


def _result(
    cc: CrossCoder,
    train: Any,
    store: ActivationStore,
    tokenizer: PreTrainedTokenizerBase,
    template: Sequence[int],
    table: Mapping[str, Sequence[Any]],
    files: Mapping[str, str],
    evidence: Optional[dict[str, Any]],
    activation: str,
) -> dict[str, Any]:
    """One crosscoder's entry of the summary: its fit, the paper's counts, its chat-specific latents, the patching."""
    share = token_share(cc, store, template)
    specific = [j for j, c in enumerate(table["class"]) if c == "chat_specific"]
    latents = describe_latents(cc, store, specific, tokenizer, template, table, share)
    return dict(
        activation=activation,
        dict_size=cc.dict_size,
        k=cc.k,
        **evaluate(cc, store),
        dead_fraction=train.last.get("dead_fraction"),
        **files,
        checkpoint=train.checkpoint,
        **_verdicts(table, {d["latent"]: d["on_template"] for d in latents}),
        chat_specific_latents=latents,
        causal=evidence,
    )


def describe(summary: Mapping[str, Any]) -> list[str]:
    """The summary as the lines the command prints."""
    lines = []
    pair = summary.get("pair")
    if pair:
        b, c = pair["behaviour"]["base"], pair["behaviour"]["chat"]
        lines.append(
            "model pair (tiny Llama): greedy answers exactly as planted, base -> chat: "
            + ", ".join(f"{kind} {b[kind]:.0%} -> {c[kind]:.0%}" for kind in ("question", "harmful", "false", "true"))
        )
    lines.append(
        f"{summary['tokens']} paired activations of layer {summary['layer']}; template tokens "
        f"{summary['template_tokens']}; torch {summary['torch']} on {summary['threads']} thread(s)"
    )
    lines.append(
        f"{'crosscoder':>10} {'FVE':>6} {'L0':>6} {'chat-only':>9} {'specific':>8} {'artifacts':>9} {'on template':>11}"
    )
    for name, r in summary["crosscoders"].items():
        on = r["chat_specific_on_template"]
        lines.append(
            f"{name:>10} {r['fve']:>6.3f} {r['l0']:>6.1f} {r['chat_only_by_delta_norm']:>9} "
            f"{r['chat_specific']:>8} {r['not_chat_specific']:>9} {on:>11}"
        )
    lines.append(
        "chat-only: Delta_norm > 0.9; specific: Latent Scaling confirms (nu_error < 0.2, nu_reconstruction "
        "< 0.5); artifacts: the rest (shrinkage, decoupling or never fired); on template: chat-specific "
        "latents most of whose 20 max-activating examples are chat-template tokens."
    )
    for name, r in summary["crosscoders"].items():
        if r.get("causal") is not None:
            lines += describe_causal(name, r["causal"])
    for name, r in summary["crosscoders"].items():
        lines.append(f"{name}: {r['report']} ({r['table']}); chat-specific latents:")
        for d in r["chat_specific_latents"]:
            tokens = ", ".join(f"{t} x{c}" for t, c in d["top_tokens"].items())
            lines.append(
                f"  {d['latent']:>5} Delta_norm {d['delta_norm']:.2f} nu_error {d['nu_error']:+.2f} "
                f"nu_recon {d['nu_reconstruction']:+.2f}{' TEMPLATE' if d['on_template'] else ''}: "
                f"{tokens} | ...{d['context'][-70:]}"
            )
    lines.append(f"{summary['seconds']['total']} s in all ({summary['seconds']})")
    return lines
