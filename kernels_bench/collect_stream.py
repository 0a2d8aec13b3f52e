"""Collection's memory and padding: peak RSS of `collect` for two corpus sizes a decade apart (documents stream,
so it should not grow with the corpus), and the share of padded positions with and without length packing.

A tiny random Llama pair (width 16, 3 blocks, a word-level tokenizer) keeps the models' own memory small, so what
grows with the corpus would show. Each collection runs in a fresh subprocess that reports its peak RSS.

    python -m kernels_bench collect_stream            # writes results/cpu-collect-stream.{json,md}
    python -m kernels_bench collect_stream --quick    # smaller corpora, writes nothing unless --out
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from . import timing

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(200)]


def _pair(root):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    paths = []
    for seed, name in ((0, "base"), (1, "chat")):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        path = os.path.join(root, name)
        LlamaForCausalLM(config).save_pretrained(path)
        fast.save_pretrained(path)
        paths.append(path)
    return paths


def _corpus(path, documents, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(documents):
            words = " ".join(f"w{rng.randrange(200)}" for _ in range(rng.randint(4, 120)))
            fh.write(json.dumps({"text": "<bos> " + words}) + "\n")


def _child(base, chat, data, out, pack_window):
    from crossdiff_ext.data import activations

    t0 = time.perf_counter()
    store = activations.collect(
        base, chat, 1, data, out, device="cpu", progress=False, pack_window=pack_window, batch_size=8
    )
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(rows=len(store), seconds=seconds, peak_rss_mib=rss)))


def _padding(data, batch_size, pack_window):
    """Padded share of the positions the forwards run, from the documents' lengths alone."""
    from crossdiff_ext.data import activations

    lengths = [len(d.split()) for d in activations.iter_documents(data)]
    window = batch_size * pack_window
    real = padded = 0
    for start in range(0, len(lengths), window):
        chunk = lengths[start : start + window]
        if pack_window > 1:
            chunk = sorted(chunk, reverse=True)
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            real += sum(batch)
            padded += max(batch) * len(batch)
    return 1 - real / padded


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kernels_bench collect_stream", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        base, chat, data, out, window = args.child
        _child(base, chat, data, out, int(window))
        return
    sizes = (300, 3000) if args.quick else (2000, 20000)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        base, chat = _pair(root)
        for documents in sizes:
            data = os.path.join(root, f"corpus-{documents}.jsonl")
            _corpus(data, documents)
            for window in (1, 64):
                out = os.path.join(root, f"store-{documents}-{window}")
                command = [
                    sys.executable,
                    "-m",
                    "kernels_bench",
                    "collect_stream",
                    "--child",
                    base,
                    chat,
                    data,
                    out,
                    str(window),
                ]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(
                    dict(documents=documents, pack_window=window, padding=_padding(data, 8, window), **measured)
                )
    record = dict(
        machine=timing.machine_info(),
        commit=timing.git_commit(),
        command="python -m kernels_bench collect_stream " + " ".join(argv if argv is not None else sys.argv[1:]),
        rows=rows,
    )
    lines = [
        "# Collection: peak memory against corpus size, padding with and without length packing",
        "",
        f"Machine: {record['machine']['device']}; commit {record['commit']}. Command: `{record['command']}`.",
        "Tiny random Llama pair (d 16, 3 blocks), batches of 8 documents of 4-120 words.",
        "",
        "| documents | pack window | rows | seconds | peak RSS MiB | padded share of positions |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['documents']} | {r['pack_window']} | {r['rows']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['padding']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else os.path.join(RESULTS, "cpu-collect-stream"))
    if out:
        timing.write_json_atomic(out + ".json", record)
        timing.write_atomic(out + ".md", text)


if __name__ == "__main__":
    main()
