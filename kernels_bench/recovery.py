"""Recovery of planted dictionaries over several seeds: what a crosscoder finds of each concept kind.

Per seed, one planted dictionary (shared, chat-only, base-only and weak-in-base concepts, ``cx.planted_dictionary``)
is drawn and a BatchTopK and an L1 crosscoder are trained on it, each from the independent per-model init (the
default, as in the paper's runs) and from the shared init. For every planted concept: recovered when the most
similar latent's concatenated decoder row has cosine > 0.9, and "in band" when that latent's Delta_norm lies in the
concept kind's band (chat-only > 0.9, base-only < 0.1, shared within 0.1 of 0.5, weak-in-base in between): the
scoring of crossdiff_ext.truth.score_recovery. Results are pooled per kind over the seeds, so one lucky seed cannot
carry them.

    python -m kernels_bench recovery --seeds 5          # the default setting, writes results/recovery.{json,md}
    python -m kernels_bench recovery --quick            # small and short, writes nothing unless --out
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import crossdiff_ext as cx
from crossdiff_ext import atomic, truth

from . import timing


@dataclass
class Setting:
    """One planted dictionary and training recipe (the defaults: 96 concepts in 32 dimensions, k = 4)."""

    n_shared: int = 48
    n_chat_only: int = 16
    n_base_only: int = 16
    n_weak_in_base: int = 16
    d_model: int = 32
    dict_size: int = 192
    k: int = 4
    n_tokens: int = 50_000
    active_per_token: float = 3.0
    weak_scale: float = 0.3
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 2e-3
    warmup_steps: int = 1000
    dead_tokens: int = 10_000_000
    l1_coefficient: float = 0.041

    def planted(self, seed):
        return cx.planted_dictionary(
            n_tokens=self.n_tokens,
            d_model=self.d_model,
            n_shared=self.n_shared,
            n_chat_only=self.n_chat_only,
            n_base_only=self.n_base_only,
            n_weak_in_base=self.n_weak_in_base,
            active_per_token=self.active_per_token,
            weak_scale=self.weak_scale,
            seed=seed,
        )


def train_and_match(setting: Setting, seed: int, activation: str, init: str, planted=None) -> list:
    """Train one crosscoder on the seed's planted dictionary; one row per planted concept."""
    planted = planted if planted is not None else setting.planted(seed)
    torch.manual_seed(seed)
    cc = cx.CrossCoder(
        setting.d_model,
        setting.dict_size,
        2,
        k=setting.k if activation == "batch_topk" else None,
        activation=activation,
        init=init,
    )
    cx.train(
        cc,
        planted.x,
        cx.TrainConfig(
            steps=setting.steps,
            batch_size=setting.batch_size,
            lr=setting.lr,
            warmup_steps=setting.warmup_steps,
            dead_tokens=setting.dead_tokens,
            l1_coefficient=setting.l1_coefficient,
            seed=seed,
            progress=False,
            log_every=setting.steps,
        ),
    )
    return cx.score_recovery(cc, planted).rows()


CASES = (("batch_topk", "independent"), ("batch_topk", "shared"), ("relu", "independent"), ("relu", "shared"))


def run(setting: Setting, seeds, cases=CASES, after_seed=None, previous=None) -> dict:
    """Every case on every seed; `after_seed(result)` is called with the result so far after each seed (so a long
    run that is stopped keeps what it measured). `previous`: an earlier result of the same setting and cases whose
    seeds are taken as they are (a resumed run)."""
    results = {f"{a}/{i}": dict(activation=a, init=i, per_seed={}) for a, i in cases}
    rows = {name: {} for name in results}
    t0 = time.perf_counter()
    done = []
    if previous is not None:
        if previous["setting"] != asdict(setting) or set(previous["results"]) != set(results):
            raise ValueError("--resume: the earlier result has another setting or other cases")
        rows = {name: {int(k): v for k, v in r.items()} for name, r in previous["rows"].items()}
        for name, r in previous["results"].items():
            results[name]["per_seed"] = {int(k): v for k, v in r["per_seed"].items()}
        done = list(previous["seeds"])
        t0 -= previous["seconds"]
    machine, commit = timing.machine_info(), timing.git_commit(cwd=os.path.dirname(os.path.abspath(__file__)))
    for seed in seeds:
        if seed in done:
            continue
        planted = setting.planted(seed)
        for activation, init in cases:
            name = f"{activation}/{init}"
            t = time.perf_counter()
            mine = train_and_match(setting, seed, activation, init, planted)
            rows[name][seed] = mine
            results[name]["per_seed"][seed] = dict(
                truth.recovery_by_kind(mine), seconds=round(time.perf_counter() - t, 1)
            )
        for name in results:
            results[name]["pooled"] = truth.recovery_by_kind(
                [r for seed_rows in rows[name].values() for r in seed_rows]
            )
        done.append(seed)
        result = dict(
            setting=asdict(setting),
            seeds=list(done),
            results=results,
            rows=rows,
            seconds=round(time.perf_counter() - t0, 1),
            device=machine["device"],
            threads=machine["torch_threads"],
            torch=machine["torch"],
            commit=commit,
        )
        if after_seed is not None:
            after_seed(result)
    return result


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"# Planted-dictionary recovery over {len(result['seeds'])} seeds",
        "",
        f"{s['n_shared']} shared, {s['n_chat_only']} chat-only, {s['n_base_only']} base-only, "
        f"{s['n_weak_in_base']} weak-in-base (x{s['weak_scale']}) concepts, d={s['d_model']}, "
        f"F={s['dict_size']}, k={s['k']} (BatchTopK), mu={s['l1_coefficient']} (L1), {s['steps']} steps of "
        f"{s['batch_size']}, lr {s['lr']}, {s['n_tokens']} tokens; seeds {result['seeds']}; "
        f"{result['threads']} CPU threads, torch {result['torch']}, commit {result['commit']}; "
        f"{result['seconds']} s in all.",
        "",
        "Recovered: a latent with decoder cosine > 0.9. In band: recovered and its Delta_norm in the kind's "
        "band (weak-in-base: between the shared and chat-only bands). Pooled over seeds; worst seed's recovery "
        "in brackets.",
        "",
        "| crosscoder | init | kind | recovery (worst seed) | in band | Delta_norm of the recovered |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in result["results"].values():
        for kind, p in r["pooled"].items():
            worst = min(v[kind]["recovery"] for v in r["per_seed"].values())
            rng = "-" if p["delta_norm_min"] is None else f"{p['delta_norm_min']:.3f}-{p['delta_norm_max']:.3f}"
            name = "BatchTopK" if r["activation"] == "batch_topk" else "L1"
            lines.append(
                f"| {name} | {r['init']} | {kind} | {p['recovery']:.3f} ({worst:.3f}) | {p['in_band']:.3f} | {rng} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels_bench recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a small, short setting (smoke test)")
    parser.add_argument("--out", default=None, help="output prefix (default results/recovery unless --quick)")
    parser.add_argument("--resume", action="store_true", help="keep the seeds already in the output's JSON")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    setting = (
        Setting(
            n_shared=8,
            n_chat_only=4,
            n_base_only=4,
            n_weak_in_base=4,
            d_model=16,
            dict_size=48,
            k=3,
            n_tokens=8000,
            steps=300,
            batch_size=256,
            warmup_steps=30,
        )
        if args.quick
        else Setting()
    )
    if args.steps is not None:
        setting.steps = args.steps
    out = args.out or (None if args.quick else os.path.join(os.path.dirname(__file__), "results", "recovery"))

    def write(result):
        print(f"seed {result['seeds'][-1]} done ({result['seconds']} s)", file=sys.stderr, flush=True)
        if out:
            atomic.write_json(out + ".json", result, indent=2)
            atomic.write_text(out + ".md", markdown(result))

    previous = None
    if args.resume:
        if not out or not os.path.isfile(out + ".json"):
            parser.error(f"--resume: no earlier result at {out}.json")
        with open(out + ".json", encoding="utf-8") as f:
            previous = json.load(f)
    print(markdown(run(setting, range(args.seeds), after_seed=write, previous=previous)))


if __name__ == "__main__":
    main()
