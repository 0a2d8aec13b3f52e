"""The `crossdiff` command line.

crossdiff collect --base B --chat C --layer L --data FILE --out STORE   paired activations -> activation store
crossdiff train --store STORE --out RUN --dict-size F -k K              train a crosscoder on a store
torchrun --nproc-per-node 8 -m crossdiff_ext train ... --latent-parallel 4   the same on a 2 x 4 mesh
crossdiff scale --checkpoint RUN/step-N --store STORE --out latents.csv  Latent Scaling + the latent table
crossdiff report --checkpoint RUN/step-N --store STORE --out report.html the HTML report (and the table)

crossdiff miniature --out DIR   the paper's finding in miniature: L1 vs BatchTopK on a planted dictionary,
                                Delta_norm's chat-only latents against the truth, Latent Scaling's verdicts

crossdiff demo    the main job on its embedded default: a tiny base/chat transformers pair (built once, cached),
                  paired activations, BatchTopK and L1 crosscoders, Latent Scaling, tables and HTML reports;
                  --base NAME --chat NAME --layer L runs it on real models
crossdiff planted plant a dictionary of shared, chat-only, base-only and weak-in-base concepts in paired
                  activations, train a BatchTopK crosscoder on them, and check the decoder-norm bands against
                  the planted truth
"""

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import distributed as cxd
from . import training
from .data import MixedBatches, activations
from .data.store import ActivationStore
from .demo import demo as dm
from .demo import miniature as mini
from .demo import synthetic
from .diffing import analysis
from .diffing.report import report_crosscoder, scaled_table
from .layer import CrossCoder
from .training import TrainConfig


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
        threads=args.threads or None,
    )
    try:
        config.validate()
    except ValueError as err:
        args.parser.error(str(err))
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
    cc = CrossCoder(args.d_model, args.dict_size, 2, k=args.k, threshold_start_step=100)
    training.train(
        cc,
        planted.x,
        TrainConfig(
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
        ),
    )
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
    store = activations.collect(
        args.base,
        args.chat,
        args.layer,
        args.data,
        args.out,
        max_tokens=args.max_tokens,
        context_length=args.context_length,
        batch_size=args.batch_size,
        drop_first=args.drop_first,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
    )
    print(f"{args.out}: {len(store)} tokens of layer {args.layer}, [2, {store.d_model}] each, {store.meta['dtype']}")
    return 0


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`crossdiff train`: train a crosscoder on one or more stores, in one process or on a torchrun mesh."""
    if args.latent_parallel < 1 or (args.data_parallel is not None and args.data_parallel < 1):
        parser.error("--latent-parallel and --data-parallel must be >= 1")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.latent_parallel > 1 or args.data_parallel
    if distributed and "RANK" not in os.environ:
        parser.error(
            "--latent-parallel / --data-parallel need a torchrun launch, e.g. torchrun --nproc-per-node 8 "
            "-m crossdiff_ext train ..."
        )
    if args.mix is not None and len(args.mix) != len(args.store):
        parser.error(f"--mix needs one fraction per --store ({len(args.store)}), got {len(args.mix)}")
    stores = [ActivationStore(path) for path in args.store]
    if len({(s.n_models, s.d_model) for s in stores}) != 1:
        parser.error(f"the stores' shapes differ: {[(s.path, s.n_models, s.d_model) for s in stores]}")
    if distributed:
        args.device = _init_distributed(args, parser)
    if len(stores) == 1:
        data = stores[0]
    else:
        fractions = args.mix or [1.0 / len(stores)] * len(stores)
        data = MixedBatches(list(zip(stores, fractions)), args.batch_size, seed=args.seed, device=args.device)
    store = stores[0]
    torch.manual_seed(args.seed)
    # A sharded run builds the whole initial crosscoder on the CPU of every rank (the same seed gives the same
    # weights everywhere) and keeps its shard.
    cc = CrossCoder(
        store.d_model,
        args.dict_size,
        store.n_models,
        k=args.k if args.activation == "batch_topk" else None,
        activation=args.activation,
        device="cpu" if distributed else args.device,
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


def _init_distributed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    """Join the torchrun job (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.latent_parallel:
        parser.error(f"--latent-parallel {args.latent_parallel} must divide the number of processes {world}")
    if args.data_parallel and args.data_parallel * args.latent_parallel != world:
        parser.error(
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
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = [ActivationStore(path) for path in args.store]
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


def report(args: argparse.Namespace) -> int:
    """`crossdiff report`: Latent Scaling, the latent table and max-activating examples -> an HTML page."""
    cc = CrossCoder.from_pretrained(args.checkpoint, device=args.device)
    stores = [ActivationStore(path) for path in args.store]
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
    )
    print(
        f"{args.out}: report on {cc.dict_size} latents ({len(chosen)} fine-tuned-specific listed); table {table_path}"
    )
    return 0


def miniature(args: argparse.Namespace) -> int:
    """`crossdiff miniature`: L1 vs BatchTopK on a planted dictionary (demo/miniature.py); prints the results."""
    summary = mini.run(
        args.out, steps=args.steps, seed=args.seed, l1_coefficient=args.l1_coefficient, progress=not args.quiet
    )
    for r in summary["results"]:
        print(
            f"{r['model']:>9}: FVE {r['fve']:.3f}, L0 {r['l0']}; Delta_norm > 0.9: {r['chat_only_by_delta_norm']} "
            f"latents, {r['of_which_not_chat_only']} of them not a planted chat-only concept "
            f"{r['false_chat_only_kinds']}; Latent Scaling on those: {r['latent_scaling_verdicts_on_false']}; "
            f"nu_error of weak-in-base latents (planted {summary['planted']['weak_scale']}): "
            f"{r['weak_in_base_nu_error']}"
        )
    print(f"{args.out}/summary.json, {args.out}/miniature.png")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `crossdiff` command: parse `argv` (default sys.argv[1:]) and run the subcommand; returns its exit
    status."""
    parser = argparse.ArgumentParser(prog="crossdiff", description="Model diffing with crosscoders.")
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
    p.add_argument("--device", default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the same table on any core count; 0: torch's default)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=demo, parser=p)

    p = sub.add_parser("planted", help="train on a planted dictionary and check what the diffing metric finds")
    p.add_argument("--tokens", type=int, default=30000)
    p.add_argument("--d-model", type=int, default=64)
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
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l1-coefficient", type=float, default=0.1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=miniature)

    p = sub.add_parser("collect", help="paired activations of a base and a fine-tuned model -> activation store")
    p.add_argument("--base", required=True, help="base model: directory or hub name")
    p.add_argument("--chat", required=True, help="fine-tuned model: directory or hub name (its tokenizer is used)")
    p.add_argument("--layer", type=int, required=True, help="residual stream after this block (0-based)")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL ({'text'} or {'messages'} per line), .txt, a directory of "
        "those, or hf:NAME[:SPLIT] (a Hugging Face dataset; needs the datasets package)",
    )
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--drop-first", type=int, default=1, help="tokens dropped at the start of every sequence (BOS)")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-rows", type=int, default=1 << 18)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=collect)

    p = sub.add_parser("train", help="train a crosscoder on an activation store")
    p.add_argument("--store", required=True, action="append", help="activation store; repeat to mix several")
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
        type=int,
        default=1,
        help="under torchrun: split the latents over this many ranks (exact batch top-k across them)",
    )
    p.add_argument(
        "--data-parallel",
        type=int,
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
    p.set_defaults(fn=lambda args, p=p: train(args, p))

    for name, fn, what in (
        ("scale", scale, "Latent Scaling of every latent -> the latent table (CSV / Parquet)"),
        ("report", report, "Latent Scaling, latent table and max-activating examples -> HTML"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--checkpoint", required=True, help="a crosscoder directory (save_pretrained / a step-N dir)")
        p.add_argument("--store", required=True, action="append", help="activation store(s) to score on")
        p.add_argument("--out", required=True, help="latents.csv / .parquet" if name == "scale" else "report.html")
        p.add_argument("--probe", default="chat", choices=["chat", "base"])
        p.add_argument("--batch-size", type=int, default=4096)
        p.add_argument("--device", default=None)
        p.add_argument("--quiet", action="store_true")
        if name == "report":
            p.add_argument("--tokenizer", default=None, help="default: the store's chat model, when local")
            p.add_argument("--top", type=int, default=20, help="fine-tuned-specific latents listed")
            p.add_argument("--title", default="crossdiff_ext: which concepts did fine-tuning introduce?")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
