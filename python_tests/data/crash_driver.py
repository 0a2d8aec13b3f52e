"""kill -9 `crossdiff collect` and `crossdiff train` at chosen and at random moments, resume them, and compare with an
uninterrupted run bit for bit.

Run by python_tests/data/test_crash.py in a subprocess (OMP_NUM_THREADS=1, PYTHONPATH at the checkout under test):
    python crash_driver.py WORKDIR --seeds 11 12 13 --kills 3 [--unsafe]
prints one JSON summary line on stdout and exits 0; a failed check exits 1 with the reason on stderr.

The driver imports torch and transformers once, then runs every `crossdiff` command in a forked child
(cli.main(argv), exactly what the console script runs), so a kill costs no interpreter start. A child dies by
SIGKILL either from inside the atomic writer (CROSSDIFF_FAULT=kill:N, crossdiff_ext/atomic.py: at its Nth write
step, a just-written temporary file cut to half first) or from this process after a random delay (anywhere:
model loading, forward, statistics, optimizer step, a write). After every kill the output is opened as a user
would (ActivationStore, CrossCoder.from_pretrained and the trainer state) and must either be what the
uninterrupted run had written at that point, byte for byte, or be absent as a whole; then the command is rerun
with --resume, and the finished output must equal the uninterrupted run's: every file of the store, the final
checkpoint's weights and trainer state.

--unsafe replaces the atomic writer with in-place writes (temporary name = target, directories built in place),
so the checks must catch a torn file: the test suite runs it to show they can fail.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import traceback

import torch

torch.set_num_threads(1)

import tqdm  # noqa: E402
import transformers  # noqa: E402  (imported before forking: the children start warm)
from transformers import LlamaForCausalLM  # noqa: E402,F401

# tqdm's write lock is a multiprocessing semaphore that forked children share: a child killed while holding it
# would hang every later one. No bars here (the commands run with --quiet), and each child gets its own lock.
transformers.utils.logging.disable_progress_bar()

import crossdiff_ext as cx  # noqa: E402
from crossdiff_ext import atomic, cli  # noqa: E402
from crossdiff_ext.data.store import COLUMNS, ActivationStore, StoreWriter  # noqa: E402
from crossdiff_ext.layer import checkpoints  # noqa: E402
from crossdiff_ext.training import checkpoints as checkpointing  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # python_tests: tiny_models
from tiny_models import make_model  # noqa: E402

DOCUMENTS = 14
TRAIN_STEPS = 16


class CheckFailed(Exception):
    pass


def check(ok, message):
    if not ok:
        raise CheckFailed(message)


# --- children -------------------------------------------------------------------------------------------------


def unsafe_writer():
    """In-place writes: what the checks must catch."""

    def temp_beside(path, write):  # the same numbered steps as the atomic writer's, on the target itself
        path = os.fspath(path)
        open(path, "wb").close()
        atomic.fault_point("created", path)
        write(path)
        atomic.fault_point("written", path)
        atomic.fault_point("synced", path)
        return path

    def replace_all(pairs):
        for _, path in pairs:
            atomic.fault_point("renamed", path)

    def temp_dir(parent, name):
        final = os.path.join(parent, name)
        os.makedirs(final, exist_ok=True)
        return final

    def replace_dir(tmp, final, *, replace=True):
        atomic.fault_point("dir-complete", os.fspath(final))
        atomic.fault_point("dir-renamed", os.fspath(final))
        return final

    for name, fn in dict(temp_beside=temp_beside, replace_all=replace_all, temp_dir=temp_dir).items():
        setattr(atomic, name, fn)
    atomic.replace_dir = replace_dir


def start(argv, log, fault=None, record=None, keep_checkpoints=False, unsafe=False):
    """Fork a child that runs `crossdiff argv`; returns its pid. record: a file the child writes its write steps
    (stage, path) to when it finishes."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        tqdm.tqdm.set_lock(threading.RLock())
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.pop(atomic.FAULT_ENV, None)
        if fault:
            os.environ[atomic.FAULT_ENV] = fault
        steps = []
        if record:
            os.environ[atomic.FAULT_ENV] = "count"
            original = atomic.fault_point

            def recording(stage, path):
                steps.append((stage, path))
                original(stage, path)

            atomic.fault_point = recording
        if keep_checkpoints:  # the reference run keeps every checkpoint, to compare with any later state
            checkpointing.prune = lambda directory, keep: None
        if unsafe:
            unsafe_writer()
        code = cli.main(argv)
        if record:
            with open(record, "w") as fh:
                json.dump(steps, fh)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid, kill_after=None, limit=120.0):
    """Wait for the child (SIGKILL it after kill_after seconds); returns (killed, exit code or None)."""
    t0 = time.perf_counter()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - t0 > limit:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise CheckFailed(f"a child ran for more than {limit} s (hung?)")
        if kill_after is not None and time.perf_counter() - t0 >= kill_after:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        check(os.WTERMSIG(status) == signal.SIGKILL, f"child died of signal {os.WTERMSIG(status)}")
        return True, None
    return False, os.WEXITSTATUS(status)


def run_to_end(argv, log, **kwargs):
    t0 = time.perf_counter()
    killed, code = wait(start(argv, log, **kwargs))
    check(not killed and code == 0, f"crossdiff {' '.join(argv)} failed (exit {code}):\n{open(log).read()[-3000:]}")
    return time.perf_counter() - t0


def fault_line(log):
    """The kill's phase from the writer's stderr line: (stage, file kind)."""
    if not os.path.exists(log):  # killed before it opened its log
        return None
    for line in open(log):
        if line.startswith(f"{atomic.FAULT_ENV}: SIGKILL"):
            stage, path = line.split("(", 1)[1].rstrip(")\n").split(" ", 1)
            return stage, file_kind(path)
    return None


def file_kind(path):
    name = os.path.basename(path.rstrip("/")).lstrip(".")
    kinds = ("shard-", *(f"{key}-" for key in COLUMNS), "store.json", "model.safetensors", "config.json", "trainer.pt")
    for kind in kinds:
        if name.startswith(kind) or f"/{kind}" in path or f"/.{kind}" in path:
            return kind.rstrip("-")
    if name.startswith("step-"):
        return "step-dir"
    return name


# --- what an interrupted output may look like ------------------------------------------------------------------


def same_files(a, b, names):
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            check(fa.read() == fb.read(), f"{os.path.join(a, name)} differs from the uninterrupted run's {name}")


def check_store(out, reference):
    """The store opens at the uninterrupted run's state after some number of whole shards, or is not there."""
    if not os.path.exists(os.path.join(out, "store.json")):
        return 0.0
    try:
        store = ActivationStore(out)
    except Exception as err:
        raise CheckFailed(f"torn read: the store at {out} does not open after a kill: {type(err).__name__}: {err}")
    ref = ActivationStore(reference)
    n = len(store.meta["shards"])
    check(store.meta["shards"] == ref.meta["shards"][:n], f"{out}: shard list is not a prefix of the reference's")
    names = [entry[key] for entry in store.meta["shards"] for key in ("file", *COLUMNS) if key in entry]
    same_files(out, reference, names)
    check(len(store) == sum(e["rows"] for e in ref.meta["shards"][:n]), f"{out}: {len(store)} rows")
    return n / len(ref.meta["shards"])  # the fraction done


def equal(a, b, where):
    if isinstance(a, torch.Tensor):
        check(isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs")
    elif isinstance(a, dict):
        check(isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys differ")
        for key in a:
            equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        check(type(a) is type(b) and len(a) == len(b), f"{where}: lengths differ")
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy arrays of the RNG states
        check(a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), f"{where} differs")
    else:
        check(a == b, f"{where}: {a!r} != {b!r}")


def check_checkpoint(step_dir, reference_dir):
    """A checkpoint opens as a user would open it, and equals the uninterrupted run's at the same step."""
    try:
        cc = cx.CrossCoder.from_pretrained(step_dir)
        weights, state = checkpoints.read_training_state(cx.CrossCoder, step_dir)
    except Exception as err:
        raise CheckFailed(f"torn read: checkpoint {step_dir} does not load after a kill: {type(err).__name__}: {err}")
    same_files(step_dir, reference_dir, [checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME])
    ref_weights, ref_state = checkpoints.read_training_state(cx.CrossCoder, reference_dir)
    equal(weights, ref_weights, f"{step_dir} weights")
    # Python's and numpy's global generators are saved but never seeded by `crossdiff train` (a fresh process
    # draws them from the OS) and no step draws from them: the two runs need not agree there. torch's must.
    for key in ("python", "numpy"):
        state["rng"].pop(key, None), ref_state["rng"].pop(key, None)
    check(state["config"].pop("checkpoint_dir") == os.path.dirname(step_dir), f"{step_dir}: checkpoint_dir")
    ref_state["config"].pop("checkpoint_dir")
    equal(state, ref_state, f"{step_dir} trainer state")
    equal(cc.state_dict(), cx.CrossCoder.from_pretrained(reference_dir).state_dict(), f"{step_dir} model")


def check_run(out, reference):
    """Every checkpoint of the run loads and equals the uninterrupted run's; returns the fraction done."""
    if not os.path.isdir(out):
        return 0.0
    steps = sorted(name for name in os.listdir(out) if checkpointing.CHECKPOINT_PATTERN.match(name))
    for name in steps:
        check_checkpoint(os.path.join(out, name), os.path.join(reference, name))
    return int(steps[-1][5:]) / TRAIN_STEPS if steps else 0.0


# --- the two commands -----------------------------------------------------------------------------------------


def setup(work):
    models = os.path.join(work, "models")
    base, chat = make_model(os.path.join(models, "base"), 0), make_model(os.path.join(models, "chat"), 1)
    g = torch.Generator().manual_seed(7)
    lines = {"web": [], "chat": []}
    for i in range(DOCUMENTS):
        words = " ".join(
            f"w{int(j)}" for j in torch.randint(0, 50, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
        )
        if i % 3 == 0:
            messages = [{"role": "user", "content": words}, {"role": "assistant", "content": "w1 w2"}]
            lines["chat"].append(json.dumps({"messages": messages}))
        else:
            lines["web"].append(json.dumps({"text": "<bos> " + words}))
    data = []  # a mixture of two sources: the rows record their document and source
    for kind, kept in lines.items():
        data.append(os.path.join(work, f"{kind}.jsonl"))
        with open(data[-1], "w") as fh:
            fh.write("\n".join(kept) + "\n")
    store = os.path.join(work, "train-store")
    with StoreWriter(store, 2, 8, dtype="float32", shard_rows=256) as w:
        w.append(torch.randn(640, 2, 8, generator=torch.Generator().manual_seed(3)))
    return base, chat, data, store


def collect_argv(base, chat, data, out):
    # 4 documents per batch, 8 rows per shard: a shard (and store.json) is written every few batches, and the
    # batches the resumed run restarts in are cut inside a document. The data: two sources mixed 2:1 from a seed.
    return [
        "collect", "--base", base, "--chat", chat, "--layer", "1", "--data", f"{data[0]}:2", f"{data[1]}:1",
        "--seed", "5", "--out", out, "--dtype",
        "float32", "--shard-rows", "8", "--batch-size", "4", "--drop-first", "1", "--device", "cpu", "--quiet",
        "--resume",
    ]  # fmt: skip


def train_argv(store, out):
    argv = [
        "train", "--store", store, "--out", out, "--dict-size", "32", "-k", "4", "--steps", str(TRAIN_STEPS),
        "--batch-size", "32", "--lr", "3e-3", "--checkpoint-every", "2", "--target-rms", "1", "--device", "cpu",
        "--quiet",
    ]  # fmt: skip
    return argv + (["--resume"] if checkpointing.latest_checkpoint(out) else [])


def campaign(name, work, argv_for, check_output, final_check, targets, seeds, kills, unsafe, reference_of=None):
    """Reference run, then per seed: `kills` kills (the first in the middle of writing a file of the kind
    targets[seed's index % len(targets)], the others at a random write step or a random time), a check after each,
    resume, and the final comparison. reference_of: reuse that campaign's uninterrupted run."""
    reference = os.path.join(work, f"{reference_of or name}-reference")
    steps_file = os.path.join(work, f"{reference_of or name}-steps.json")
    if reference_of is None:
        seconds = run_to_end(argv_for(reference), os.path.join(work, f"{name}-reference.log"), record=steps_file,
                             keep_checkpoints=True)  # fmt: skip
        with open(os.path.join(work, f"{name}-seconds"), "w") as fh:
            fh.write(str(seconds))
    seconds = float(open(os.path.join(work, f"{reference_of or name}-seconds")).read())
    steps = json.load(open(steps_file))
    phases, attempts, delivered, checks, resumed_identical = {}, 0, 0, 0, 0
    for index, seed in enumerate(seeds):
        target = targets[index % len(targets)]
        data_steps = [
            i + 1 for i, (stage, path) in enumerate(steps) if stage == "written" and file_kind(path) == target
        ]
        check(data_steps, f"the uninterrupted {name} wrote no {target} file")
        rng = random.Random(seed)
        out = os.path.join(work, f"{name}-{seed}")
        done = 0.0
        for attempt in range(kills):
            log = os.path.join(work, f"{name}-{seed}-{attempt}.log")
            left = 1.0 - done  # of the uninterrupted run's write steps and seconds: where a kill can still land
            if attempt == 0:  # in the middle of writing a file: the torn temporary file must never be read
                killed, _ = wait(start(argv_for(out), log, fault=f"kill:{rng.choice(data_steps)}", unsafe=unsafe))
            elif attempt % 2:
                n = rng.randint(1, max(1, int(len(steps) * left)))
                killed, _ = wait(start(argv_for(out), log, fault=f"kill:{n}", unsafe=unsafe))
            else:
                killed, _ = wait(start(argv_for(out), log, unsafe=unsafe), kill_after=rng.uniform(0, seconds * left))
            attempts += 1
            if not killed:
                done = 1.0
                continue  # the run finished first; the next attempt resumes a complete output
            delivered += 1
            phase = fault_line(log)
            key = "random time" if phase is None else f"{phase[0]} {phase[1]}"
            phases[key] = phases.get(key, 0) + 1
            done = check_output(out, reference)
            checks += 1
        run_to_end(argv_for(out), os.path.join(work, f"{name}-{seed}-final.log"), unsafe=unsafe)
        final_check(out, reference)
        resumed_identical += 1
    return dict(reference_seconds=round(seconds, 3), write_steps=len(steps), attempts=attempts, kills=delivered,
                phases=phases,
                checks=checks, resumed_identical=resumed_identical, seeds=len(seeds))  # fmt: skip


def collect_final(out, reference):
    check(sorted(os.listdir(out)) == sorted(os.listdir(reference)), f"{out} holds {sorted(os.listdir(out))}")
    ref = ActivationStore(reference)
    check(ActivationStore(out).meta == ref.meta, f"{out}/store.json differs from the uninterrupted run's")
    check(len(ref.source_names) == 2 and ref.sources().unique().tolist() == [0, 1], f"{reference}: no provenance")
    same_files(out, reference, [n for n in os.listdir(reference) if n != "store.json"])


def train_final(out, reference):
    check(check_run(out, reference) == 1.0, f"{out}: no {checkpointing.step_dir_name(TRAIN_STEPS)}")
    leftovers = [name for name in os.listdir(out) if name.startswith(".")]
    check(not leftovers or all(name.startswith(".step-") for name in leftovers), f"{out}: {leftovers}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("work")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--unsafe", action="store_true")
    parser.add_argument("--only", choices=["collect", "train"], default=None)
    parser.add_argument(
        "--also-unsafe", action="store_true", help="then one kill with in-place writes per command: it must be caught"
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    base, chat, data, store = setup(args.work)
    summary = {}
    try:
        if args.only in (None, "collect"):
            targets = ["store.json"] if args.unsafe else ["shard", "store.json", *COLUMNS]
            summary["collect"] = campaign("collect", args.work, lambda out: collect_argv(base, chat, data, out),
                                          check_store, collect_final, targets, args.seeds, args.kills,
                                          args.unsafe)  # fmt: skip
        if args.only in (None, "train"):
            targets = ["model.safetensors", "trainer.pt", "config.json"]
            summary["train"] = campaign("train", args.work, lambda out: train_argv(store, out),
                                        check_run, train_final, targets, args.seeds, args.kills,
                                        args.unsafe)  # fmt: skip
        if args.also_unsafe:
            summary["unsafe_caught"] = {}
            for name, argv_for, check_output, final_check, target in (
                ("collect", lambda out: collect_argv(base, chat, data, out), check_store, collect_final, "store.json"),
                ("train", lambda out: train_argv(store, out), check_run, train_final, "model.safetensors"),
            ):
                if name not in summary:
                    continue
                try:
                    campaign(f"unsafe-{name}", args.work, argv_for, check_output, final_check, [target], [0], 1, True,
                             reference_of=name)  # fmt: skip
                except CheckFailed as err:
                    summary["unsafe_caught"][name] = str(err)
                else:
                    raise CheckFailed(f"in-place writes to the {name} output went unnoticed")
    except CheckFailed as err:
        print(json.dumps(dict(failed=str(err), **summary)))
        print(f"check failed: {err}", file=sys.stderr)
        sys.exit(1)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
