"""Max-activating examples from a store, the HTML report, `crossdiff scale` / `crossdiff report` end to end on a
tiny model pair, and the page rendered in headless Chromium (a screenshot is taken)."""

import csv
import os
import shutil
import subprocess

import pytest
import torch

import crossdiff_ext as cx
from crossdiff_ext.data import activations
from crossdiff_ext.data.store import StoreWriter
from crossdiff_ext.diffing import curves, examples, report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def store_with_tokens(path, rows, token_ids, positions):
    with StoreWriter(path, 2, rows.shape[-1], dtype="float32", shard_rows=7) as w:
        w.append(rows, token_ids, positions)
    return cx.ActivationStore(path)


def test_max_activating_examples_and_quantiles(tmp_path):
    # Latent 0 reads coordinate 0 of both models; its activation at row r is r (rows 0..19), so the top rows
    # and the quantile rows are known. Two sequences: rows 0-11 and 12-19 (positions restart).
    d, n = 4, 20
    x = torch.zeros(n, 2, d)
    x[:, :, 0] = torch.arange(n, dtype=torch.float32)[:, None]
    cc = cx.CrossCoder(d, 3, 2, activation="relu")
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0, :, 0] = 0.5
        cc.b_enc.zero_()
    positions = torch.cat([torch.arange(12), torch.arange(8)])
    store = store_with_tokens(tmp_path / "s", x, torch.arange(100, 100 + n), positions)
    found = examples.max_activating_examples(cc, store, [0, 2], n=3, quantiles=(0.5,), before=2, after=1, batch_size=6)
    top = found[0].top
    assert [e.row for e in top] == [19, 18, 17] and [e.activation for e in top] == [19.0, 18.0, 17.0]
    assert top[0].tokens == [117, 118, 119] and top[0].focus == 2  # no token after the last row
    assert found[0].count == 19  # row 0 has activation 0
    q = found[0].quantiles[0]
    assert q.row == 10 and q.tokens == [108, 109, 110, 111] and q.focus == 2
    assert found[2].count == 0 and found[2].top == []
    # Context never crosses into another sequence: row 12 starts the second one.
    e12 = examples.max_activating_examples(cc, store, [0], n=8, before=3, after=0)[0].top[-1]
    assert e12.row == 12 and e12.tokens == [112] and e12.focus == 0
    with pytest.raises(ValueError, match="no token ids"):
        with StoreWriter(tmp_path / "bare", 2, d, dtype="float32") as w:
            w.append(x)
        examples.max_activating_examples(cc, cx.ActivationStore(tmp_path / "bare"), [0])


def test_render_has_every_section():
    from handmade_crosscoders import artifact_crosscoder

    cc, x = artifact_crosscoder()
    table = cx.latent_table(cc, cx.latent_scaling(cc, x))
    page = report.render(table, title="t <&>", meta=dict(tokens=len(x)))
    assert page.count("<img") == 3 and "data:image/png;base64," in page
    assert "t &lt;&amp;&gt;" in page  # escaped
    for heading in (
        "Latent classes",
        "Delta_norm",
        "Latent Scaling",
        "Decoder cosine",
        "Top fine-tuned-specific latents",
    ):
        assert heading in page
    assert report.fine_tuned_latents(table) == [1]  # the one genuinely chat-specific latent
    plain = report.render(cx.latent_table(cc))  # without Latent Scaling: no nu plot, chat-only by Delta_norm
    assert plain.count("<img") == 2 and report.fine_tuned_latents(cx.latent_table(cc)) == [1, 3, 4]


def test_scale_and_report_commands(pair, data, tmp_path):  # noqa: F811
    from crossdiff_ext import cli

    store = activations.collect(*pair, 1, data, tmp_path / "store", device="cpu", progress=False)
    torch.manual_seed(0)
    cc = cx.CrossCoder(store.d_model, 24, 2, k=2, threshold_start_step=2)
    cx.train(
        cc,
        store,
        cx.TrainConfig(
            steps=20, batch_size=16, warmup_steps=2, progress=False, lr=1e-2, checkpoint_dir=str(tmp_path / "run")
        ),
    )
    ckpt = str(tmp_path / "run" / "step-00000020")
    assert (
        cli.main(
            [
                "scale",
                "--checkpoint",
                ckpt,
                "--store",
                str(tmp_path / "store"),
                "--out",
                str(tmp_path / "latents.csv"),
                "--quiet",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "latents.csv")))
    assert len(rows) == 24 and {"delta_norm", "nu_error", "nu_reconstruction", "class"} <= set(rows[0])
    page = tmp_path / "report.html"
    assert (
        cli.main(
            [
                "report",
                "--checkpoint",
                ckpt,
                "--store",
                str(tmp_path / "store"),
                "--out",
                str(page),
                "--quiet",
                "--top",
                "24",
            ]
        )
        == 0
    )
    text = page.read_text()
    assert (tmp_path / "report.csv").exists() and "Top fine-tuned-specific latents" in text
    # the curves of the run's log beside the step-N checkpoint
    drawn = curves.curve_series(cx.read_log(tmp_path / "run" / "log.jsonl"))
    assert "Training curves" in text and text.count("<img") == 3 + len(drawn)
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/install installs it where it runs as root)")
    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1000,1600",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000  # a rendered page, not a blank one
    dom = subprocess.run(cmd[:-2] + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Top fine-tuned-specific latents" in dom.stdout and dom.stdout.count("<img") == 3 + len(drawn)
    from PIL import Image  # matplotlib depends on pillow

    with Image.open(shot) as im:
        colours = im.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # dark text/plots on a light page
    assert os.path.getsize(page) > 10_000


def test_contexts_read_as_text():
    # The word-level tokenizer of the demo, and a byte-level BPE (spaces live inside the tokens, and a character
    # may span two tokens): the parts concatenate to the decoded context, the activating token is marked.
    from handmade_crosscoders import artifact_crosscoder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from crossdiff_ext.demo import toy_language as tl

    words = tl.make_tokenizer()
    ids = words("how do i make tea ?", add_special_tokens=False)["input_ids"]
    e = examples.Example(latent=1, activation=2.5, row=7, tokens=ids, focus=4)
    assert e.text(words) == ("how do i make ", "tea", "?")  # the decoder puts no space before "?"
    assert examples.split_context(words, ids, 0) == ("", "how", " do i make tea?")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = "how do i make tea? très bien"
    bpe.train_from_iterator([text] * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bpe = PreTrainedTokenizerFast(tokenizer_object=bpe)
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    for focus in range(len(ids)):
        before, token, after = examples.split_context(bpe, ids, focus)
        assert before + token + after == text and token.strip() == token
    tea = next(i for i in range(len(ids)) if bpe.decode(ids[i : i + 1]).strip() == "tea")
    assert examples.split_context(bpe, ids, tea) == ("how do i make ", "tea", "? très bien")

    cc, x = artifact_crosscoder()
    table = cx.latent_table(cc, cx.latent_scaling(cc, x))
    found = {1: examples.LatentExamples(1, 1, top=[e])}
    page = report.render(table, examples=found, tokenizer=words)
    assert 'how do i make <span class="focus">tea</span>?' in page
    assert '[101][102]<span class="focus">[103]</span>' in report.render(
        table, examples={1: examples.LatentExamples(1, 1, top=[examples.Example(1, 1.0, 0, [101, 102, 103], 2)])}
    )
