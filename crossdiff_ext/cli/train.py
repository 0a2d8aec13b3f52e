"""`crossdiff train`: train a crosscoder on one or more activation stores, or online on two models, in one
process or on a torchrun mesh. The training settings are TrainConfig's fields, one generated flag each."""

import argparse
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import distributed as cxd
from .. import training
from ..data import MixedBatches, OnlineActivations
from ..data.store import ActivationStore
from ..errors import InputError
from ..layer import CrossCoder
from ..layer.partition import check_partition
from .common import at_least, open_stores, output_dir
from .config_flags import add_train_config_flags, train_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register train's flags: data, crosscoder, mesh, and one flag per TrainConfig field."""
    p.add_argument("--store", default=None, action="append", help="activation store; repeat to mix several")
    p.add_argument("--base", default=None, help="online: the base model (no store; both models run as training goes)")
    p.add_argument("--chat", default=None, help="online: the chat model")
    p.add_argument("--layer", type=at_least(0), default=None, help="online: the block whose output is harvested")
    p.add_argument("--data", default=None, help="online: JSONL / .txt file or directory, or hf:NAME[:SPLIT]")
    p.add_argument("--buffer-tokens", type=at_least(1), default=1 << 16, help="online: rows in the shuffle buffer")
    p.add_argument("--context-length", type=at_least(1), default=1024, help="online: tokens kept per document")
    p.add_argument("--drop-first", type=at_least(0), default=1, help="online: leading positions not harvested")
    p.add_argument(
        "--mix",
        type=float,
        nargs="+",
        default=None,
        help="fraction of every batch per --store, in order (default: equal shares)",
    )
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--dict-size", type=at_least(1), required=True)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--activation", default="batch_topk", choices=["batch_topk", "relu"])
    p.add_argument(
        "--target-rms",
        type=float,
        default=None,
        help="normalise each model's inputs to this RMS norm (statistics from the stores; saved)",
    )
    p.add_argument(
        "--partition",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="dedicated latents: how many of the first latents belong to each model only, in model order (two "
        "models: N_BASE_ONLY N_CHAT_ONLY); the rest are shared (default: all shared)",
    )
    p.add_argument("--device", default=None, help="under torchrun: default cuda:LOCAL_RANK, or cpu without GPUs")
    p.add_argument(
        "--latent-parallel",
        type=at_least(1),
        default=1,
        help="under torchrun: split the latents over this many ranks (exact batch top-k across them)",
    )
    p.add_argument(
        "--data-parallel",
        type=at_least(1),
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
    add_train_config_flags(p)


def _check_data_flags(args: argparse.Namespace, distributed: bool) -> None:
    """The data flags fit together: a store or the online quartet, --mix per store, torchrun for a mesh.

    Raises:
        InputError: They do not.
    """
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
    if args.mix is not None:
        if args.store is None or len(args.mix) != len(args.store):
            raise InputError(f"--mix needs one fraction per --store ({len(args.store or [])}), got {len(args.mix)}")
        if any(f <= 0 for f in args.mix) or abs(sum(args.mix) - 1.0) > 1e-6:
            raise InputError(f"--mix: expected fractions > 0 that sum to 1, got {args.mix}")


def _online_source(args: argparse.Namespace) -> OnlineActivations:
    return OnlineActivations(
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


def _mixture(args: argparse.Namespace, stores: list[ActivationStore]) -> Any:
    if len(stores) == 1:
        return stores[0]
    fractions = args.mix or [1.0 / len(stores)] * len(stores)
    try:
        return MixedBatches(list(zip(stores, fractions)), args.batch_size, seed=args.seed, device=args.device)
    except InputError as err:  # name the flags behind the library's words
        raise InputError(f"--mix {' '.join(map(str, fractions))} with --batch-size {args.batch_size}: {err}") from err


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


def _train_sharded(cc: CrossCoder, data: Any, config: training.TrainConfig, args: argparse.Namespace) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Check every setting, then train; prints the last log record. Returns the exit status."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.latent_parallel > 1 or args.data_parallel
    _check_data_flags(args, distributed)
    output_dir(args.out)
    config = train_config_from_args(args, checkpoint_dir=args.out, progress=not args.quiet)
    stores: Optional[list[ActivationStore]] = open_stores(args.store) if args.store is not None else None
    n_models = stores[0].n_models if stores is not None else 2  # online training runs a base and a chat model
    partition = check_partition(args.partition, n_models, args.dict_size, name="--partition")  # before models load
    online = _online_source(args) if stores is None else None
    shape_source = online if stores is None else stores[0]
    crosscoder = dict(
        d_model=shape_source.d_model,
        dict_size=args.dict_size,
        n_models=shape_source.n_models,
        k=args.k if args.activation == "batch_topk" else None,
        activation=args.activation,
        target_rms=args.target_rms,
        partition=partition,
    )
    CrossCoder(**crosscoder, device="meta")  # checks the settings before any work
    if distributed:
        args.device = _init_distributed(args)
    data = online if stores is None else _mixture(args, stores)
    torch.manual_seed(args.seed)
    # A sharded run builds the whole initial crosscoder on the CPU of every rank (the same seed gives the same
    # weights everywhere) and keeps its shard.
    cc = CrossCoder(**crosscoder, device="cpu" if distributed else args.device)
    if distributed:
        _train_sharded(cc, data, config, args)
        return 0
    result = training.train(cc, data, config, resume=args.resume)
    print(f"trained {result.steps} steps; last log: {result.last}; checkpoint: {result.checkpoint}")
    return 0
