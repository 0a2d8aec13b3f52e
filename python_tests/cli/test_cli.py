"""The `crossdiff` command line: the planted run's verdict, the training flags generated from TrainConfig, the one
reading of --latents, and steer's error for a model path that holds no model."""

import dataclasses
import json

import pytest

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.cli import common, config_flags, steer
from crossdiff_ext.errors import InputError, MissingInputError


def _run_json(capsys, argv):
    code = cli.main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_planted_recovers_every_concept_and_exits_0(capsys):
    # 1000 steps on 4000 tokens recover all 34 (600 steps: 32, 800: 33); 15 s on one core (pytest --durations).
    code, out = _run_json(capsys, ["planted", "--steps", "1000", "--tokens", "4000", "--json", "--quiet"])
    assert out["summary"]["concepts"] == len(out["concepts"]) == 34
    assert out["summary"]["recovered_and_classified"] == 34, [c for c in out["concepts"] if not c["correct"]]
    assert all(c["correct"] and c["cosine"] > 0.9 for c in out["concepts"])
    assert {c["kind"] for c in out["concepts"]} == {"shared", "chat_only", "base_only", "weak_in_base"}
    assert code == 0


def test_planted_exits_1_when_concepts_are_missed(capsys):
    code, out = _run_json(capsys, ["planted", "--steps", "1", "--tokens", "500", "--json", "--quiet"])
    assert out["summary"]["recovered_and_classified"] < 34
    assert code == 1


def _train_parser():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices["train"]


def test_every_train_config_field_has_a_flag_with_its_default():
    train = _train_parser()
    by_flag = {flag: action for action in train._actions for flag in action.option_strings}
    args = train.parse_args(["--store", "s", "--out", "o", "--dict-size", "8"])
    defaults = cx.TrainConfig()
    for field in dataclasses.fields(cx.TrainConfig):
        flag = config_flags.flag_name(field.name)
        assert flag in by_flag, (field.name, flag)
        if field.name not in config_flags.FROM_OTHER_FLAGS:
            assert by_flag[flag].dest == field.name
            assert getattr(args, field.name) == getattr(defaults, field.name), field.name
            assert field.metadata["doc"] in by_flag[flag].help
    config = config_flags.train_config_from_args(args, checkpoint_dir="o", progress=False)
    assert config == dataclasses.replace(defaults, checkpoint_dir="o", progress=False)


def test_train_config_flags_set_every_kind_of_field():
    argv = ["--store", "s", "--out", "o", "--dict-size", "8", "--warmup-steps", "5", "--decay-start", "0.5"]
    argv += ["--grad-clip", "none", "--k-aux", "3", "--no-fit-normalization", "--betas", "0.8", "0.99"]
    argv += ["--mixed-precision", "bf16", "--init-b-dec", "zero", "--log-path", "l.jsonl", "--aux-alpha", "0.5"]
    config = config_flags.train_config_from_args(_train_parser().parse_args(argv), checkpoint_dir="o", progress=True)
    assert (config.warmup_steps, config.decay_start, config.grad_clip, config.k_aux) == (5, 0.5, None, 3)
    assert (config.fit_normalization, config.betas, config.mixed_precision) == (False, (0.8, 0.99), "bf16")
    assert (config.init_b_dec, config.log_path, config.aux_alpha) == ("zero", "l.jsonl", 0.5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "--steps: expected an int >= 1, got 0"),
        (["--decay-start", "1.5"], "--decay-start: expected a number in [0, 1) or None, got 1.5"),
        (["--reconstruction", "l3"], "--reconstruction: expected one of ['l2', 'squared'], got 'l3'"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints: expected an int >= 1, got 0"),
    ],
)
def test_a_bad_training_setting_is_named_by_its_flag(tmp_path, capsys, extra, message):
    argv = ["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--dict-size", "8", *extra]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"crossdiff train: error: {message}\n"


def test_latents_are_read_the_same_way_by_steer_and_causal(tmp_path):
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    specs = {}
    for name in ("steer", "causal"):
        (action,) = [a for a in sub.choices[name]._actions if "--latents" in a.option_strings]
        specs[name] = (action.nargs, action.type, action.help)
    assert specs["steer"] == specs["causal"] and specs["steer"][2] == common.LATENTS_HELP

    (tmp_path / "ids.json").write_text("[4, 5]")
    (tmp_path / "sets.json").write_text('{"pair": [0, 1], "more": [2]}')
    (tmp_path / "causal.json").write_text('{"kl": {}, "latent_sets": {"old": [7]}}')
    assert common.parse_latents(["3", "17"]) == {"latents": [3, 17]}
    assert common.parse_latents([str(tmp_path / "ids.json")]) == {"ids": [4, 5]}
    assert common.parse_latents(["9", str(tmp_path / "sets.json"), str(tmp_path / "causal.json")]) == {
        "latents": [9],
        "pair": [0, 1],
        "more": [2],
        "old": [7],
    }
    with pytest.raises(InputError, match="'x1' is neither a latent id nor a JSON file"):
        common.parse_latents(["x1"])
    with pytest.raises(MissingInputError, match="does not exist"):
        common.parse_latents([str(tmp_path / "none.json")])
    with pytest.raises(InputError, match="steer takes one set of latents, got 2"):
        steer.run(
            _steer_args(["--latents", str(tmp_path / "sets.json"), "--ablate"], checkpoint="c", model="m", parser=sub)
        )


def _steer_args(extra, checkpoint, model, parser):
    argv = ["--checkpoint", checkpoint, "--model", model, "--layer", "0", "--prompt", "a b", *extra]
    return parser.choices["steer"].parse_args(argv)


@pytest.mark.parametrize("model", ["missing", "empty"])
def test_steer_with_a_bad_model_path_gives_one_line(tmp_path, capsys, model):
    cx.CrossCoder(4, 8, 2, k=2).save_pretrained(tmp_path / "cc")
    (tmp_path / "empty").mkdir()
    argv = ["steer", "--checkpoint", str(tmp_path / "cc"), "--model", str(tmp_path / model), "--layer", "0"]
    assert cli.main([*argv, "--latents", "1", "--prompt", "a b", "--ablate"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    expected = "the model directory does not exist" if model == "missing" else "the model cannot be loaded"
    assert err.startswith(f"crossdiff steer: error: --model '{tmp_path / model}': {expected}"), err
