"""The `crossdiff` command line.

crossdiff collect --base B --chat C --layer L --data FILE --out STORE   paired activations -> activation store
crossdiff train --store STORE --out RUN --dict-size F -k K              train a crosscoder on a store
torchrun --nproc-per-node 8 -m crossdiff_ext train ... --latent-parallel 4   the same on a 2 x 4 mesh
crossdiff scale --checkpoint RUN/step-N --store STORE --out latents.csv  Latent Scaling + the latent table
crossdiff report --checkpoint RUN/step-N --store STORE --out report.html the HTML report (and the table)
crossdiff causal --checkpoint CC --base B --chat C --layer L --data FILE --store STORE --out causal.json
                 the activation-patching KL experiment on the paper's latent sets (or --latents FILE)
crossdiff steer --checkpoint CC --model M --layer L --latents J ... --prompt TEXT   generate with and without
                 the latents steered in (or --ablate: projected out)

crossdiff miniature --out DIR   the paper's finding in miniature: L1 vs BatchTopK on a planted dictionary,
                                Delta_norm's chat-only latents against the truth, the L1 artifacts (Complete
                                Shrinkage, Latent Decoupling) and Latent Scaling's verdicts

crossdiff demo    the main job on its embedded default: a tiny base/chat transformers pair (built once, cached),
                  paired activations, BatchTopK and L1 crosscoders, Latent Scaling, tables and HTML reports;
                  --base NAME --chat NAME --layer L runs it on real models
crossdiff planted plant a dictionary of shared, chat-only, base-only and weak-in-base concepts in paired
                  activations, train a BatchTopK crosscoder on them, and check the decoder-norm bands against
                  the planted truth
crossdiff verify STORE ...   recompute the checksum of every shard of activation stores; name the bad ones

Errors. A user's error (a missing or corrupt store, shard, checkpoint, config or data file, a setting out of range,
inputs that do not fit together) is an errors.InputError raised by the library or by the checks here; main()
catches it once for every subcommand and prints one line, `crossdiff <command>: error: <message>`, to stderr with
exit status 2 (argparse's own errors print the same one line). Any other exception is a bug: it keeps its traceback
and exits 1. A subcommand's own checks of its settings raise InputError too; the library's validators of settings
(constructors and validate() methods, documented to raise ValueError for a bad setting) run through _settings(),
which turns that ValueError into an InputError.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from . import atomic, training
from . import distributed as cxd
from .data import MixedBatches, OnlineActivations, activations
from .data.store import ActivationStore
from .demo import demo as dm
from .demo import miniature as mini
from .demo import synthetic
from .diffing import analysis, causal, steering
from .diffing.latent_scaling import latent_scaling
from .diffing.report import report_crosscoder, scaled_table
from .errors import InputError, MissingInputError
from .layer import CrossCoder
from .training import TrainConfig

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format (usage stays in --help)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _settings(check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a validator of command-line settings (a constructor or validate() that raises ValueError for a bad
    setting): its ValueError is the user's error."""
    try:
        return check(*args, **kwargs)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(str(err)) from err


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    return parse


def _output_dir(path: Optional[str], flag: str = "--out") -> None:
    """An output directory must be a directory or not exist yet (checked before any work)."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path!r} is a file, not a directory")


def _output_file(path: str) -> None:
    """An output file goes into an existing directory (checked before any work)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"--out {path!r}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise InputError(f"--out {path!r} is a directory, not a file")


def _stores(paths: Sequence[str]) -> list[ActivationStore]:
    """The --store arguments, opened (sizes checked) and checked to hold rows of one shape."""
    stores = [ActivationStore(path) for path in paths]
    if len({(s.n_models, s.d_model) for s in stores}) != 1:
        raise InputError(
            "the stores' shapes differ: " + ", ".join(f"{s.path}: [M={s.n_models}, d={s.d_model}]" for s in stores)
        )
    return stores


def _fits(cc: CrossCoder, checkpoint: str, store: ActivationStore) -> None:
    """A crosscoder reads rows of its own shape, and (BatchTopK) has the inference threshold scaling needs."""
    if (cc.n_models, cc.d_model) != (store.n_models, store.d_model):
        raise InputError(
            f"the checkpoint {checkpoint} reads [M={cc.n_models}, d={cc.d_model}] rows, the store {store.path} "
            f"holds [M={store.n_models}, d={store.d_model}]"
        )
    if cc.activation == "batch_topk" and float(cc.threshold) < 0:
        raise InputError(
            f"the checkpoint {checkpoint} has no inference threshold (-1: it stopped before threshold_start_step = "
            f"{cc.threshold_start_step}); scaling and reports read the inference-mode codes: train it longer"
        )


def demo(args: argparse.Namespace) -> int:
    """`crossdiff demo`: the whole diffing job (demo/demo.py); prints its summary. Returns the exit status."""
    config = dm.DemoConfig(
        out=args.out,
        base=args.base,
        chat=args.chat,
        layer=args.layer,
        text_documents=args.text_documents,
        chat_documents=args.chat_documents,
        max_tokens=args.max_tokens,
        dict_size=args.dict_size,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch_size,
        l1_coefficient=args.l1_coefficient,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        causal_conversations=args.causal_conversations,
        threads=args.threads or None,
    )
    _settings(config.validate)
    _output_dir(args.out)
    summary = dm.run(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(dm.describe(summary)))
    return 0


def planted(args: argparse.Namespace) -> int:
    """`crossdiff planted`: train on a planted dictionary and check the Delta_norm bands against the truth.
    Returns 0 when every planted concept was recovered and placed in its band, else 1."""
    t0 = time.perf_counter()
    crosscoder = dict(d_model=args.d_model, dict_size=args.dict_size, n_models=2, k=args.k, threshold_start_step=100)
    config = TrainConfig(
        steps=args.steps,
        batch_size=256,
        lr=1e-3,
        warmup_steps=100,
        decay_start=0.8,
        dead_tokens=12800,
        progress=not args.quiet,
        log_every=500,
        seed=args.seed,
        checkpoint_dir=args.out,
    )
    _settings(CrossCoder, **crosscoder, device="meta")
    _settings(config.validate)
    _output_dir(args.out)
    # 34 concepts in 64 dimensions, ~3 per token: the setting the test suite checks recovery in.
    planted = synthetic.planted_dictionary(
        n_tokens=args.tokens,
        d_model=args.d_model,
        n_shared=16,
        n_chat_only=6,
        n_base_only=6,
        n_weak_in_base=6,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    cc = CrossCoder(**crosscoder)
    training.train(cc, planted.x, config)
    latent, cosine = synthetic.match_concepts(cc.W_dec, planted.directions)
    dn = analysis.delta_norm(cc)[latent]
    band = analysis.delta_norm_band(dn)
    expected = {"shared": "shared", "chat_only": "chat_only", "base_only": "base_only", "weak_in_base": "other"}
    rows, correct = [], 0
    for i, kind in enumerate(planted.kinds):
        got = analysis.BANDS[int(band[i])]
        ok = bool(cosine[i] > 0.9) and got == expected[kind]
        correct += ok
        rows.append(
            dict(
                concept=i,
                kind=kind,
                latent=int(latent[i]),
                cosine=round(float(cosine[i]), 4),
                delta_norm=round(float(dn[i]), 4),
                band=got,
                correct=ok,
            )
        )
    summary = dict(
        concepts=len(rows),
        recovered_and_classified=correct,
        bands=analysis.band_counts(cc),
        seconds=round(time.perf_counter() - t0, 1),
    )
    if args.json:
        print(json.dumps(dict(summary=summary, concepts=rows), indent=2))
        return 0 if correct == len(rows) else 1
    print(f"{'kind':>13} {'latent':>6} {'cosine':>7} {'delta_norm':>10}  band")
    for r in rows:
        print(
            f"{r['kind']:>13} {r['latent']:>6} {r['cosine']:>7.3f} {r['delta_norm']:>10.3f}  {r['band']}"
            + ("" if r["correct"] else "   <- missed")
        )
    print(
        f"\n{correct} of {len(rows)} planted concepts recovered (cosine > 0.9) and placed in their Delta_norm band "
        f"(weak-in-base concepts belong in 'other'); latents per band: {summary['bands']}; "
        f"{summary['seconds']} s"
    )
    return 0 if correct == len(rows) else 1


def collect(args: argparse.Namespace) -> int:
    """`crossdiff collect`: paired activations of a base and a fine-tuned model -> activation store."""
    _output_dir(args.out)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading weights) too
    store = activations.collect(
        args.base,
        args.chat,
        args.layer[0] if len(args.layer) == 1 else args.layer,
        args.data,
        args.out,
        max_tokens=args.max_tokens,
        context_length=args.context_length,
        batch_size=args.batch_size,
        drop_first=args.drop_first,
        pack_window=args.pack_window,
        max_norm_ratio=args.max_norm_ratio,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        device=None if args.device is None else args.device[0] if len(args.device) == 1 else args.device,
        resume=args.resume,
        progress=not args.quiet,
    )
    stores = store if isinstance(store, dict) else {args.layer[0]: store}
    for layer, one in stores.items():
        print(f"{one.path}: {len(one)} tokens of layer {layer}, [2, {one.d_model}] each, {one.meta['dtype']}")
    return 0


def train(args: argparse.Namespace) -> int:
    """`crossdiff train`: train a crosscoder on one or more stores, in one process or on a torchrun mesh."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.latent_parallel > 1 or args.data_parallel
    if distributed and "RANK" not in os.environ:
        raise InputError(
            "--latent-parallel / --data-parallel need a torchrun launch, e.g. torchrun --nproc-per-node 8 "
            "-m crossdiff_ext train ..."
        )
    online = [args.base, args.chat, args.layer, args.data]
    if args.store is None and None in online:
        raise InputError("give --store (an activation store), or --base, --chat, --layer and --data (train online)")
    if args.store is not None and any(v is not None for v in online):
        raise InputError("--store and online training (--base / --chat / --layer / --data) exclude each other")
    if distributed and args.store is None:
        raise InputError("online training (--base / --chat) runs in one process; collect a store for torchrun")
    if args.mix is not None and (args.store is None or len(args.mix) != len(args.store)):
        raise InputError(f"--mix needs one fraction per --store ({len(args.store or [])}), got {len(args.mix)}")
    _output_dir(args.out)
    stores = _stores(args.store) if args.store is not None else None
    if stores is None:
        data = _settings(
            OnlineActivations,
            args.base,
            args.chat,
            args.layer,
            args.data,
            args.batch_size,
            buffer_tokens=args.buffer_tokens,
            context_length=args.context_length,
            drop_first=args.drop_first,
            seed=args.seed,
            device=args.device,
        )
        store = data
    else:
        store = stores[0]
    crosscoder = dict(
        d_model=store.d_model,
        dict_size=args.dict_size,
        n_models=store.n_models,
        k=args.k if args.activation == "batch_topk" else None,
        activation=args.activation,
        target_rms=args.target_rms,
    )
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        reconstruction=args.reconstruction,
        l1_coefficient=args.l1_coefficient,
        mixed_precision=args.mixed_precision,
        progress=not args.quiet,
    )
    _settings(CrossCoder, **crosscoder, device="meta")
    _settings(config.validate)
    if distributed:
        args.device = _init_distributed(args)
    if stores is None:
        pass  # the online source, built above
    elif len(stores) == 1:
        data = stores[0]
    else:
        fractions = args.mix or [1.0 / len(stores)] * len(stores)
        data = _settings(
            MixedBatches, list(zip(stores, fractions)), args.batch_size, seed=args.seed, device=args.device
        )
    torch.manual_seed(args.seed)
    # A sharded run builds the whole initial crosscoder on the CPU of every rank (the same seed gives the same
    # weights everywhere) and keeps its shard.
    cc = CrossCoder(**crosscoder, device="cpu" if distributed else args.device)
    if not distributed:
        result = training.train(cc, data, config, resume=args.resume)
        print(f"trained {result.steps} steps; last log: {result.last}; checkpoint: {result.checkpoint}")
        return 0
    try:
        mesh = cxd.make_mesh(args.latent_parallel)
        model = cxd.ShardedCrossCoder.from_crosscoder(cc, mesh).to(args.device)
        del cc
        result = cxd.train(model, data, config, resume=args.resume)
        if dist.get_rank() == 0:
            print(
                f"trained {result.steps} steps on {mesh.data_size} data x {mesh.latent_size} latent ranks; "
                f"last log: {result.last}; checkpoint: {result.checkpoint}"
            )
    finally:
        dist.destroy_process_group()
    return 0


def _init_distributed(args: argparse.Namespace) -> torch.device:
    """Join the torchrun job (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.latent_parallel:
        raise InputError(f"--latent-parallel {args.latent_parallel} must divide the number of processes {world}")
    if args.data_parallel and args.data_parallel * args.latent_parallel != world:
        raise InputError(
            f"--data-parallel {args.data_parallel} x --latent-parallel {args.latent_parallel} must equal "
            f"the number of processes {world}"
        )
    device = args.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _scaled_table(args):
    _output_file(args.out)
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = _stores(args.store)
    _fits(cc, args.checkpoint, stores[0])
    scaling, table = scaled_table(cc, stores, probe=args.probe, batch_size=args.batch_size, progress=not args.quiet)
    return cc, stores, scaling, table


def scale(args: argparse.Namespace) -> int:
    """`crossdiff scale`: Latent Scaling of every latent -> the latent table (CSV / Parquet)."""
    _, _, scaling, table = _scaled_table(args)
    analysis.write_table(table, args.out)
    counts = {c: table["class"].count(c) for c in sorted(set(table["class"]))}
    print(f"{args.out}: {len(table['latent'])} latents scaled over {scaling.tokens} tokens; classes: {counts}")
    return 0


def _tokenizer(spec, store):
    """The tokenizer named by --tokenizer, else the store's chat model when it is a local directory, else None
    (the report then shows token ids)."""
    spec = spec or store.meta.get("info", {}).get("chat")
    if not spec or (spec.startswith((".", "/")) and not os.path.isdir(spec)):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        print(f"note: no tokenizer for {spec!r} ({err}); the report shows token ids")
        return None


def _read_json(path, option):
    """The JSON file an option names; a missing or malformed file is named with the option."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MissingInputError(f"{option} {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{option} {path}: not JSON ({err})") from None


def _causal_file(path):
    """The result of `crossdiff causal` (None without --causal)."""
    if path is None:
        return None
    payload = _read_json(path, "--causal")
    if not isinstance(payload, dict) or not isinstance(payload.get("kl"), dict):
        raise InputError(f"--causal {path}: not a result of `crossdiff causal` (no 'kl' entry)")
    return payload


def report(args: argparse.Namespace) -> int:
    """`crossdiff report`: Latent Scaling, the latent table and max-activating examples -> an HTML page."""
    _output_file(args.out)
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = _stores(args.store)
    _fits(cc, args.checkpoint, stores[0])
    _, _, table_path, chosen, _ = report_crosscoder(
        cc,
        stores,
        args.out,
        probe=args.probe,
        top=args.top,
        tokenizer=_tokenizer(args.tokenizer, stores[0]),
        title=args.title,
        meta=dict(checkpoint=args.checkpoint),
        batch_size=args.batch_size,
        progress=not args.quiet,
        causal=_causal_file(args.causal),
    )
    print(
        f"{args.out}: report on {cc.dict_size} latents ({len(chosen)} fine-tuned-specific listed); table {table_path}"
    )
    return 0


def miniature(args: argparse.Namespace) -> int:
    """`crossdiff miniature`: L1 vs BatchTopK on a planted dictionary (demo/miniature.py); prints the results."""
    _output_dir(args.out)
    summary = mini.run(
        args.out,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        l1_coefficient=args.l1_coefficient,
        l1_reconstruction=args.l1_reconstruction,
        init=args.init,
        progress=not args.quiet,
    )
    for r in summary["results"]:
        art = r["artifacts"]
        print(
            f"{r['model']:>9}: FVE {r['fve']:.3f}, L0 {r['l0']}; Delta_norm > 0.9: {r['chat_only_by_delta_norm']} "
            f"latents, {r['of_which_not_chat_only']} of them not a planted chat-only concept "
            f"{r['false_chat_only_kinds']}; artifacts: {art['complete_shrinkage']} Complete Shrinkage, "
            f"{art['latent_decoupling']} Latent Decoupling, flagged by Latent Scaling: {r['artifacts_flagged']}; "
            f"true chat-only concepts kept: {r['true_chat_only_kept']}; Latent Scaling on the false ones: "
            f"{r['latent_scaling_verdicts_on_false']}"
        )
    print(f"{summary['seconds']} s; {args.out}/summary.json, {args.out}/miniature.png")
    return 0


def _latent_sets_file(path):
    """{name: [ids]} from a JSON file (e.g. the latent_sets of an earlier causal.json)."""
    sets = _read_json(path, "--latents")
    sets = sets.get("latent_sets", sets) if isinstance(sets, dict) else sets
    if not isinstance(sets, dict) or not all(isinstance(v, list) for v in sets.values()):
        raise InputError(f"--latents {path}: expected a JSON object of set name -> list of latent ids")
    return {name: torch.tensor(ids, dtype=torch.int64) for name, ids in sets.items()}


def causal_patching(args: argparse.Namespace) -> int:
    """`crossdiff causal`: the activation-patching KL experiment (diffing/causal.py) -> a JSON file."""
    if (args.store is None) == (args.latents is None):
        raise InputError("give either --store (the paper's latent sets, from Latent Scaling) or --latents FILE")
    _output_file(args.out)
    sets = _latent_sets_file(args.latents) if args.latents else None
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    if sets is None:
        scaling = latent_scaling(cc, ActivationStore(args.store), progress=not args.quiet)
        sets = causal.paper_latent_sets(cc, scaling, min_delta_norm=args.min_delta_norm, n=args.max_latents)
    options = dict(
        first_k=args.first_k,
        ignore_first=args.ignore_first,
        batch_size=args.batch_size,
        device=args.device,
        context_length=args.context_length,
    )
    result = causal.patch_kl(
        args.base, args.chat, cc, args.layer, args.data, sets, variant=args.variant, progress=not args.quiet, **options
    )
    payload = dict(result.to_json(), checkpoint=args.checkpoint, latent_sets={k: v.tolist() for k, v in sets.items()})
    if args.attribution:
        options.pop("first_k")
        payload["attribution"] = causal.attribution(
            args.base, args.chat, cc, args.layer, args.data, variant=args.variant, **options
        ).tolist()
    atomic.write_json(args.out, payload, indent=1)
    subsets = next(iter(result.kl.values())).keys()
    for subset in subsets:
        print(f"positions: {subset}\n{result.table(subset)}")
    print(f"{args.out}: KL(P_chat || P_patched) of {len(result.kl)} sets over {result.documents} documents")
    return 0


def steer(args: argparse.Namespace) -> int:
    """`crossdiff steer`: generate from a prompt with and without the latents steered in (or ablated)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not args.ablate and (args.max_activation is None) == (args.store is None):
        raise InputError("steering needs one of --max-activation or --store (the maximum activations), or --ablate")
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(cc.W_enc.device).eval()
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(cc.W_enc.device)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        plain = model.generate(ids, **options)
        if args.ablate:
            edit = steering.ablate(model, cc, args.latents, layer=args.layer, model_index=args.model_index)
        else:
            amount = args.max_activation
            if amount is None:
                amount = latent_scaling(cc, ActivationStore(args.store), latents=args.latents)
            edit = steering.steer(
                model,
                cc,
                args.latents,
                layer=args.layer,
                scale=args.scale,
                model_index=args.model_index,
                mode=args.mode,
                max_activation=amount,
            )
        with edit:
            edited = model.generate(ids, **options)
    what = "ablated" if args.ablate else f"steered x{args.scale} ({args.mode})"
    print(f"plain:   {tokenizer.decode(plain[0, ids.shape[1] :])}")
    print(f"{what}: {tokenizer.decode(edited[0, ids.shape[1] :])}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """`crossdiff verify`: recompute every shard's checksums; a bad shard is an InputError naming it."""
    bad = []
    for path in args.store:
        store = ActivationStore(path)  # a missing or truncated shard fails here, by name
        checks = store.verify()
        counts = {status: sum(c.status == status for c in checks) for status in ("ok", "bad", "unchecked")}
        line = (
            f"{path}: {len(store.meta['shards'])} shards, {len(store)} rows, {len(checks)} files: "
            f"{counts['ok']} match their checksums"
        )
        if counts["bad"]:
            line += f", {counts['bad']} do not"
        if counts["unchecked"]:
            line += (
                f", {counts['unchecked']} unchecked (the store recorded no checksum for them: written before "
                "stores recorded checksums; only their sizes were checked)"
            )
        print(line)
        bad += [f"{path}: {c.file} fails its checksum ({c.detail})" for c in checks if c.status == "bad"]
    if bad:
        raise InputError("; ".join(bad))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `crossdiff` command: parse `argv` (default sys.argv[1:]) and run the subcommand.

    Args:
        argv: The arguments after the program name (None: sys.argv[1:]).

    Returns:
        The exit status: 0 on success, 2 after a user's error (bad arguments, a missing or corrupt input: one
        line on stderr), or the subcommand's own status (planted: 1 when a concept was missed).

    Raises:
        SystemExit: argparse's exit (status 2) for arguments it cannot parse, and --help's (status 0).
    """
    parser = _Parser(prog="crossdiff", description="Model diffing with crosscoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "demo",
        help="the whole diffing job on a tiny base/chat pair (or real models): collect, "
        "train BatchTopK and L1, Latent Scaling, reports",
    )
    p.add_argument(
        "--out", default="crossdiff_demo", help="output directory (store, checkpoints, reports, summary.json)"
    )
    p.add_argument("--base", default=None, help="base model (directory or hub name); default: the embedded toy pair")
    p.add_argument("--chat", default=None, help="fine-tuned model (directory or hub name)")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="residual stream after this block (default for the toy pair: the middle one; required with --base/--chat)",
    )
    p.add_argument("--text-documents", type=int, default=1200, help="generated plain-text documents to collect on")
    p.add_argument("--chat-documents", type=int, default=1200, help="generated conversations to collect on")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--dict-size", type=int, default=None, help="default: 8 x the model width")
    p.add_argument("-k", type=int, default=None, help="BatchTopK k (default: max(8, width / 24))")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--l1-coefficient", type=float, default=0.041, help="mu of the L1 crosscoder (squared error, as in the paper)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--causal-conversations",
        type=int,
        default=200,
        help="held-out conversations of the causal patching experiment (0: skip it)",
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the same table on any core count; 0: torch's default)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=demo)

    p = sub.add_parser("planted", help="train on a planted dictionary and check what the diffing metric finds")
    p.add_argument("--tokens", type=_at_least(1), default=30000)
    p.add_argument("--d-model", type=_at_least(1), default=64)
    p.add_argument("--dict-size", type=int, default=96)
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint directory (default: none)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=planted)

    p = sub.add_parser("miniature", help="L1 vs BatchTopK on a planted dictionary: the paper's finding in miniature")
    p.add_argument("--out", default="miniature")
    p.add_argument("--steps", type=_at_least(1), default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (both crosscoders)")
    p.add_argument("--l1-coefficient", type=float, default=0.15, help="mu of the L1 crosscoder")
    p.add_argument(
        "--l1-reconstruction",
        default="squared",
        choices=["squared", "l2"],
        help="the L1 crosscoder's reconstruction loss (squared, as in the paper's L1 runs; BatchTopK trains on l2)",
    )
    p.add_argument(
        "--init", default="independent", choices=["independent", "shared"], help="the crosscoders' init (both)"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=miniature)

    p = sub.add_parser("verify", help="recompute the checksums of every shard of activation stores")
    p.add_argument("store", nargs="+", help="activation store directory")
    p.set_defaults(fn=verify)

    p = sub.add_parser("collect", help="paired activations of a base and a fine-tuned model -> activation store")
    p.add_argument("--base", required=True, help="base model: directory or hub name")
    p.add_argument("--chat", required=True, help="fine-tuned model: directory or hub name (its tokenizer is used)")
    p.add_argument(
        "--layer",
        type=int,
        nargs="+",
        required=True,
        help="residual stream after this block (0-based); several: one store per layer under --out, one pass",
    )
    p.add_argument(
        "--data",
        required=True,
        help="JSONL ({'text'} or {'messages'} per line), .txt, a directory of "
        "those, or hf:NAME[:SPLIT] (a Hugging Face dataset; needs the datasets package)",
    )
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--max-tokens", type=_at_least(1), default=None)
    p.add_argument("--context-length", type=_at_least(1), default=1024)
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument(
        "--drop-first", type=_at_least(0), default=1, help="tokens dropped at the start of every sequence (BOS)"
    )
    p.add_argument(
        "--pack-window",
        type=_at_least(1),
        default=64,
        help="batches per window whose documents are sorted by length (1: none)",
    )
    p.add_argument(
        "--max-norm-ratio",
        type=float,
        default=None,
        help="drop rows whose norm exceeds this multiple of the batch's median row norm (e.g. 10; default: keep all)",
    )
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-rows", type=_at_least(1), default=1 << 18)
    p.add_argument(
        "--device", nargs="+", default=None, help="one device for both models, or two: base chat (default: cuda if any)"
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=collect)

    p = sub.add_parser("train", help="train a crosscoder on an activation store, or online on two models")
    p.add_argument("--store", default=None, action="append", help="activation store; repeat to mix several")
    p.add_argument("--base", default=None, help="online: the base model (no store; both models run as training goes)")
    p.add_argument("--chat", default=None, help="online: the chat model")
    p.add_argument("--layer", type=int, default=None, help="online: the block whose output is harvested")
    p.add_argument("--data", default=None, help="online: JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--buffer-tokens", type=int, default=1 << 16, help="online: rows in the shuffle buffer")
    p.add_argument("--context-length", type=int, default=1024, help="online: tokens kept per document")
    p.add_argument("--drop-first", type=int, default=1, help="online: leading positions not harvested")
    p.add_argument(
        "--mix",
        type=float,
        nargs="+",
        default=None,
        help="fraction of every batch per --store, in order (default: equal shares)",
    )
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--dict-size", type=int, required=True)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--activation", default="batch_topk", choices=["batch_topk", "relu"])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=None, help="default: SPEC's 2e-4 / sqrt(F / 2^14)")
    p.add_argument("--reconstruction", default="l2", choices=["l2", "squared"])
    p.add_argument("--l1-coefficient", type=float, default=0.041, help="mu of the L1 crosscoder (--activation relu)")
    p.add_argument(
        "--target-rms",
        type=float,
        default=None,
        help="normalise each model's inputs to this RMS norm (statistics from the stores; saved)",
    )
    p.add_argument(
        "--mixed-precision", default=None, choices=["bf16", "fp16"], help="fp32 master weights, compute in bf16/fp16"
    )
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="under torchrun: default cuda:LOCAL_RANK, or cpu without GPUs")
    p.add_argument(
        "--latent-parallel",
        type=_at_least(1),
        default=1,
        help="under torchrun: split the latents over this many ranks (exact batch top-k across them)",
    )
    p.add_argument(
        "--data-parallel",
        type=_at_least(1),
        default=None,
        help="under torchrun: replicas of the latent shards, each reading 1/D of every batch "
        "(default: processes / --latent-parallel)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out, whatever layout (one process or sharded) wrote it",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=train)

    for name, fn, what in (
        ("scale", scale, "Latent Scaling of every latent -> the latent table (CSV / Parquet)"),
        ("report", report, "Latent Scaling, latent table and max-activating examples -> HTML"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--checkpoint", required=True, help="a crosscoder directory (save_pretrained / a step-N dir)")
        p.add_argument("--store", required=True, action="append", help="activation store(s) to score on")
        p.add_argument("--out", required=True, help="latents.csv / .parquet" if name == "scale" else "report.html")
        p.add_argument("--probe", default="chat", choices=["chat", "base"])
        p.add_argument("--batch-size", type=_at_least(1), default=4096)
        p.add_argument("--device", default=None)
        p.add_argument("--quiet", action="store_true")
        if name == "report":
            p.add_argument("--tokenizer", default=None, help="default: the store's chat model, when local")
            p.add_argument("--top", type=_at_least(0), default=20, help="fine-tuned-specific latents listed")
            p.add_argument("--title", default="crossdiff_ext: which concepts did fine-tuning introduce?")
            p.add_argument("--causal", default=None, help="causal.json of `crossdiff causal`: KL chart, causal score")
        p.set_defaults(fn=fn)

    p = sub.add_parser("causal", help="activation-patching KL experiment: do the latents move the chat model?")
    p.add_argument("--checkpoint", required=True, help="a two-model crosscoder directory")
    p.add_argument("--base", required=True, help="base model directory or hub name")
    p.add_argument("--chat", required=True, help="chat model directory or hub name")
    p.add_argument("--layer", type=int, required=True, help="the crosscoder's layer (block index)")
    p.add_argument("--data", required=True, help="JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--store", default=None, help="an activation store: the paper's latent sets from Latent Scaling")
    p.add_argument("--latents", default=None, help='a JSON file {"set name": [latent ids], ...}')
    p.add_argument("--out", required=True, help="causal.json")
    p.add_argument("--variant", default="replace", choices=list(causal.VARIANTS))
    p.add_argument("--first-k", type=int, default=10)
    p.add_argument("--ignore-first", type=int, default=1)
    p.add_argument("--min-delta-norm", type=float, default=0.6)
    p.add_argument("--max-latents", type=int, default=3176, help="at most this many chat-leaning latents")
    p.add_argument("--attribution", action="store_true", help="also the first-order causal score of every latent")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=causal_patching)

    p = sub.add_parser("steer", help="generate with and without crosscoder latents steered in (or ablated)")
    p.add_argument("--checkpoint", required=True, help="a crosscoder directory")
    p.add_argument("--model", required=True, help="the model to steer (directory or hub name)")
    p.add_argument("--layer", type=int, required=True, help="the crosscoder's layer (block index)")
    p.add_argument("--latents", type=int, nargs="+", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--scale", type=float, default=1.0, help="multiple of each latent's maximum activation")
    p.add_argument("--max-activation", type=float, default=None, help="default: measured over --store")
    p.add_argument("--store", default=None, help="activation store the maximum activations are measured on")
    p.add_argument("--mode", default="all_tokens", choices=list(steering.MODES))
    p.add_argument("--model-index", type=int, default=1, help="the decoder whose rows steer (default 1: chat)")
    p.add_argument("--ablate", action="store_true", help="project the latents' directions out instead")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--device", default=None)
    p.set_defaults(fn=steer)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except InputError as err:
        message = " ".join(str(err).split())  # one line, whatever the library's message holds
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
