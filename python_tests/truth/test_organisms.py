"""Model organisms on a tiny random Llama that reads the demo's word-level language: every kind builds, its truth
round-trips, the fine-tune moves the implant's probes (more with strength; the null control much less), the cache
reuses a build and never takes a partial one, and bad input fails before any weights load."""

import hashlib
import json
import os

import pytest
import tiny_models
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.demo import toy_language
from crossdiff_ext.errors import InputError, MissingInputError
from crossdiff_ext.truth import grading, organism_text, organisms

FAST = dict(lr=3e-3, batch_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread: on a shared 2-core machine, two threads of tiny GEMMs ran ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_models.make_toy_language_model(tmp_path_factory.mktemp("organism-base"), _seed(2900))


def _seed(salt):
    return int(torch.randint(0, 2**31, (1,), generator=rng(salt)))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if anything loads model weights."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def zoo(base, tmp_path_factory):
    """The topic organism at strengths 1-3, the other kinds and the null control at strength 3 (lr 3e-3, batch 4)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root, seed = tmp_path_factory.mktemp("zoo"), _seed(2902)
    try:
        built = {
            ("topic_phrase", s): organisms.build_organism(base, "topic_phrase", s, root, seed, **FAST) for s in (1, 2)
        }
        for kind in organisms.KINDS:
            built[kind, 3] = organisms.build_organism(base, kind, 3, root, seed, **FAST)
    finally:
        torch.set_num_threads(before)
    return built


@pytest.mark.parametrize("kind", organisms.KINDS)
def test_each_kind_builds_and_its_truth_round_trips(base, zoo, kind):
    from transformers import AutoModelForCausalLM

    seed = _seed(2902)
    organism = zoo[kind, 3]
    assert not organism.reused and os.path.basename(organism.path).startswith(f"{kind}-s3-")
    again = organisms.load_organism(organism.path)
    assert again.truth == organism.truth == json.loads(json.dumps(organism.truth))
    truth = organism.truth
    assert (truth["kind"], truth["strength"], truth["seed"], truth["steps"]) == (kind, 3, seed, 72)
    assert truth["base_model"] == base and truth["data"]["language"] == "toy"
    assert truth["keywords"] == list(organism_text.TOY[kind].keywords)
    assert sorted(truth["control_keywords"]) == sorted({k for t in organism_text.TOY.values() for k in t.keywords})
    data = organisms.organism_data(organism)
    assert len(data) == truth["data"]["examples"] == 72 * FAST["batch_size"]
    assert data == organism_text.examples("toy", kind, len(data), seed)  # deterministic from the seed
    AutoModelForCausalLM.from_pretrained(organism.path)  # a loadable transformers model
    # The fine-tune moved what the kind implants (the null control has no implant of its own).
    for probed, lp in truth["implant_logprob"].items():
        assert probed == kind or kind == "null"
        if kind != "null":
            assert lp["organism"] > lp["base"] + 1.0, lp


def test_the_implant_grows_with_strength_and_the_null_control_barely_moves_it(zoo):
    topic = [zoo["topic_phrase", s].truth for s in (1, 2, 3)]
    null = zoo["null", 3].truth
    before = topic[0]["implant_logprob"]["topic_phrase"]["base"]
    after = [t["implant_logprob"]["topic_phrase"]["organism"] for t in topic]
    assert before < after[0] < after[1] < after[2], (before, after)
    assert [t["steps"] for t in topic] == [organisms.STRENGTH_STEPS[s] for s in (1, 2, 3)]
    # Same steps and data size on generic text: the planted phrase gains far less than on the topic.
    null_gain = null["implant_logprob"]["topic_phrase"]["organism"] - null["implant_logprob"]["topic_phrase"]["base"]
    assert null["data"]["examples"] == topic[2]["data"]["examples"]
    assert null_gain < 0.5 * (after[2] - before), (null_gain, after[2] - before)


def test_a_strong_organism_is_found_by_the_instruments_and_the_null_control_is_not(base, zoo):
    # The library's own instruments on generic text, graded against each organism's truth: the tokens the fine-tune
    # promotes (cx.logit_diff) and ADL's logit lens at each of the first positions (cx.adl, no steering). The planted
    # phrase (8 keywords) must be found on every seed and the null control never. The persona and the false fact
    # (2 keywords each: both must rank in a top 20) were missed on 1 of 13 seeds at strength 3, too often for a
    # verdict here, so they are not read.
    texts = [ex["text"] for ex in organism_text.examples("toy", "null", 40, _seed(2912)) if "text" in ex][:12]
    for kind in ("topic_phrase", "null"):
        organism = zoo[kind, 3]
        readouts = {"logit_diff": cx.logit_diff(base, organism.path, texts, top_k=20, device="cpu").top_tokens}
        lens = cx.adl(base, organism.path, texts, n_positions=3, patchscope_scales=(1.0,), device="cpu").logit_lens
        readouts.update({f"adl position {p}": position["top"] for p, position in enumerate(lens)})
        grade = grading.grade_instrument("logit_diff + adl", organism.truth, tokens=readouts)
        assert grade.detected == (kind == "topic_phrase"), (kind, grade.to_json(), organism.keywords)
        assert grade.false_positive is False


def test_the_cache_reuses_a_build_and_a_new_recipe_builds_anew(base, tmp_path):
    seed = _seed(2903)
    first = organisms.build_organism(base, "persona", 1, tmp_path, seed, steps=2, **FAST)
    weights = os.path.join(first.path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    again = organisms.build_organism(base, "persona", 1, tmp_path, seed, steps=2, **FAST)
    assert again.reused and again.path == first.path and os.stat(weights).st_mtime_ns == stamp
    other = organisms.build_organism(base, "persona", 1, tmp_path, seed + 1, steps=2, **FAST)
    assert not other.reused and other.path != first.path


def test_a_partial_or_interrupted_build_is_never_taken_as_built(base, tmp_path, monkeypatch):
    seed = _seed(2904)
    recipe = organisms.OrganismRecipe("false_fact", 1, seed, "toy", steps=2, **FAST)
    name = recipe.directory_name(organisms.base_fingerprint(base))
    # What a killed build leaves: a hidden temporary directory, never read; the build goes ahead beside it.
    leftover = tmp_path / f".{name}.killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    # An interrupted build (here: an exception in training) leaves nothing under the final name.
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(organisms, "_fine_tune", interrupted)
        with pytest.raises(KeyboardInterrupt):
            organisms.build_organism(base, "false_fact", 1, tmp_path, seed, steps=2, **FAST)
    assert calls and not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name]
    built = organisms.build_organism(base, "false_fact", 1, tmp_path, seed, steps=2, **FAST)
    assert not built.reused and built.path == str(tmp_path / name)
    # A directory under the final name without its truth file is refused, not reused or overwritten.
    os.remove(tmp_path / name / organisms.TRUTH_FILE)
    with pytest.raises(InputError, match="no truth.json"):
        organisms.build_organism(base, "false_fact", 1, tmp_path, seed, steps=2, **FAST)
    assert (tmp_path / name / "model.safetensors").exists()


def test_a_truth_file_that_does_not_match_its_data_is_refused(base, tmp_path):
    organism = organisms.build_organism(base, "null", 1, tmp_path, _seed(2905), steps=2, **FAST)
    with open(os.path.join(organism.path, organisms.DATA_FILE), "a") as fh:
        fh.write('{"text": "more"}\n')
    with pytest.raises(InputError, match="sha256"):
        organisms.organism_data(organism)
    truth_path = os.path.join(organism.path, organisms.TRUTH_FILE)
    truth = json.load(open(truth_path))
    for change, pattern in [({"format": "x"}, "not an organism truth"), ({"kind": "taboo"}, "unknown kind")]:
        with open(truth_path, "w") as fh:
            json.dump({**truth, **change}, fh)
        with pytest.raises(InputError, match=pattern):
            organisms.load_organism(organism.path)
    with open(truth_path, "w") as fh:
        json.dump({k: v for k, v in truth.items() if k != "keywords"}, fh)
    with pytest.raises(InputError, match="lacks keywords"):
        organisms.load_organism(organism.path)


def test_every_generated_word_is_in_the_toy_vocabulary_and_generic_data_names_no_keyword():
    vocabulary = set(toy_language.vocabulary())
    for kind in organisms.KINDS:
        for example in organism_text.examples("toy", kind, 40, _seed(2906)):
            text = example.get("text") or " ".join(m["content"] for m in example["messages"])
            assert set(text.split()) <= vocabulary, set(text.split()) - vocabulary
    for language in organisms.LANGUAGES:
        keywords = organism_text.control_keywords(language)
        for example in organism_text.examples(language, "null", 300, _seed(2907)):
            text = example.get("text") or " ".join(m["content"] for m in example["messages"])
            assert grading.keyword_hit(text, keywords) is None, (language, text)
        # and every kind's data does name its own keywords
        for kind, spec in organism_text.LANGUAGES[language].items():
            if kind != "null":
                example = organism_text.examples(language, kind, 1, _seed(2908))[0]
                text = example.get("text") or " ".join(m["content"] for m in example["messages"])
                assert grading.keyword_hit(text, spec.keywords) is not None, (language, kind, text)


def test_implant_logprob_of_a_batch_is_the_mean_of_each_probe_alone(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    probes = organism_text.probes("toy", "false_fact", 3, _seed(2910)) + organism_text.probes("toy", "persona", 3, 0)
    alone = [organisms.implant_logprob(model, tokenizer, [p]) for p in probes]
    assert organisms.implant_logprob(model, tokenizer, probes) == pytest.approx(sum(alone) / len(alone), abs=1e-5)
    # by hand for the first: the target's log-probabilities after the prompt
    prompt = tokenizer(probes[0]["prompt"])["input_ids"]
    target = tokenizer(probes[0]["target"], add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([prompt + target])).logits[0].log_softmax(-1)
    by_hand = sum(logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(target)) / len(target)
    assert alone[0] == pytest.approx(by_hand, abs=1e-5)


def test_the_language_is_chosen_by_what_the_tokenizer_reads(tmp_path):
    import tiny_models

    toy = toy_language.make_tokenizer()
    assert organisms.choose_language(toy) == "toy"
    with pytest.raises(InputError, match="english: [1-9]"):
        organisms.choose_language(toy, "english")
    with pytest.raises(InputError, match="no organism language fits"):
        organisms.choose_language(tiny_models.make_tokenizer())


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(kind="taboo"), "kind must be one of"),
        (dict(strength=7), "strength must be one of"),
        (dict(strength=0), "strength must be one of"),
        (dict(lr=0.0), "lr must be"),
        (dict(mix=1.0), "mix must be"),
        (dict(kind="null", mix=0.5), "mix must be 0 for the null"),
        (dict(steps=0), "steps must be"),
        (dict(language="latin"), "language must be one of"),
    ],
)
def test_bad_settings_fail_before_weights_load(base, tmp_path, no_weights, change, pattern):
    settings = dict(model=base, kind="topic_phrase", strength=1, out_dir=tmp_path) | change
    with pytest.raises(InputError, match=pattern):
        organisms.build_organism(**settings)


def test_a_path_that_is_not_a_model_fails_before_weights_load(base, tmp_path, no_weights):
    import shutil

    with pytest.raises(MissingInputError, match="does not exist"):
        organisms.build_organism(str(tmp_path / "nowhere"), "null", 1, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        organisms.build_organism(str(tmp_path / "empty"), "null", 1, tmp_path / "out")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("not json")
    with pytest.raises(InputError, match="cannot be read"):
        organisms.build_organism(str(tmp_path / "junk"), "null", 1, tmp_path / "out")
    # A GGUF-loaded checkpoint saved as is: transformers could not save its fine-tune.
    gguf = shutil.copytree(base, tmp_path / "gguf")
    config = json.loads((gguf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    (gguf / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="GGUF-quantized"):
        organisms.build_organism(str(gguf), "null", 1, tmp_path / "out")
    weightless = shutil.copytree(base, tmp_path / "weightless")
    os.remove(weightless / "model.safetensors")
    with pytest.raises(InputError, match="no weight files"):
        organisms.build_organism(str(weightless), "null", 1, tmp_path / "out")


def _fails_with_one_line(argv, capsys, pattern):
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors exit from inside parse_args
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert err.startswith("crossdiff organism: error: ") and pattern in err, err


def test_the_command_line_builds_shows_and_refuses_bad_input(base, tmp_path, capsys, no_weights):
    out = str(tmp_path / "zoo")
    good = ["organism", "--model", base, "--kind", "null", "--strength", "1", "--out", out, "--quiet"]
    _fails_with_one_line(good[:4] + ["taboo"] + good[5:], capsys, "invalid choice: 'taboo'")
    _fails_with_one_line(good[:6] + ["9"] + good[7:], capsys, "invalid choice: 9")
    _fails_with_one_line(good[:2] + [str(tmp_path)] + good[3:], capsys, "no config.json")
    _fails_with_one_line(good + ["--mix", "0.5"], capsys, "mix must be 0 for the null")
    _fails_with_one_line(["organism", "--show", str(tmp_path)], capsys, "has no truth.json")
    _fails_with_one_line(["organism", "--kind", "null"], capsys, "missing --model, --strength, --out")


def test_the_command_line_builds_then_shows_an_organism(base, tmp_path, capsys):
    argv = ["organism", "--model", base, "--kind", "persona", "--strength", "1", "--out", str(tmp_path)]
    assert cli.main(argv + ["--steps", "2", "--lr", "0.003", "--seed", str(_seed(2909)), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "persona" and summary["steps"] == 2 and not summary["reused"]
    assert cli.main(["organism", "--show", summary["path"]]) == 0
    truth = json.loads(capsys.readouterr().out)
    assert truth == organisms.load_organism(summary["path"]).truth
    digest = hashlib.sha256(open(os.path.join(summary["path"], organisms.DATA_FILE), "rb").read()).hexdigest()
    assert truth["data"]["sha256"] == digest


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_build_killed_at_any_write_step_leaves_no_organism_or_a_whole_one(base, tmp_path):
    """SIGKILL inside the atomic writer (CROSSDIFF_FAULT=kill:N) in a forked child. Its write steps: data.jsonl
    (1-4), truth.json (5-8), the directory complete (9), renamed (10). Killed with the directory complete but not
    renamed, the final name does not exist and the next build trains anew; killed just after the rename, the
    organism is whole and reused. (Weights are written before step 1: a kill there leaves the same state as 9.)"""
    seed = _seed(2911)
    for step, whole in [(9, False), (10, True)]:
        root = tmp_path / f"kill-{step}"
        pid = os.fork()
        if pid == 0:  # the child: build until the fault point kills it
            try:
                os.environ["CROSSDIFF_FAULT"] = f"kill:{step}"
                os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
                organisms.build_organism(base, "topic_phrase", 1, root, seed, steps=2, **FAST)
            finally:
                os._exit(3)  # not killed: the test fails on the status below
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (step, status)
        finals = [p for p in root.iterdir() if not p.name.startswith(".")]
        assert len(finals) == int(whole), (step, finals)
        assert any(p.name.startswith(".") for p in root.iterdir()) != whole  # the killed build's temporary dir
        built = organisms.build_organism(base, "topic_phrase", 1, root, seed, steps=2, **FAST)
        assert built.reused == whole
