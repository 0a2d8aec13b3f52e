"""The grader on hand-made ranked lists: the matching rule (case, whitespace, sub-word markers, prefixes), ranks and
hits of tokens and latents at freshly drawn positions, the causal threshold, and the null organism's false
positives against the other kinds' keywords."""

import json
import math

import pytest
import torch
from conftest import rng

from crossdiff_ext.errors import InputError
from crossdiff_ext.truth import grading, organism_text

FACT = ["eiffel", "tower", "rome", "italy", "italian"]
NOISE = ["Ġthe", "Ġof", "Ġand", "ing", "Ġ(", "Ġfunction", "Ġlicense", "Ġsoftware", "ĠWARRANTY", "Ġ1", "Ċ", "ed"]


@pytest.mark.parametrize(
    "token,hit",
    [
        ("ĠRome", "rome"),
        (" rome ", "rome"),
        ("▁ROME", "rome"),
        ("##eiff", "eiffel"),  # a sub-word piece of at least 4 characters
        ("ĠItalians", "italian"),  # a longer word starting with the keyword
        ("TowerBridge", "tower"),  # camelCase splits into words
        ("rome.", "rome"),
        ("Rom", None),  # 3 characters: too short to count as a prefix
        ("Ġromantic", None),  # neither is a prefix of the other
        ("Ġthe", None),
        ("", None),
    ],
)
def test_keyword_hit_normalises_case_whitespace_and_subwords(token, hit):
    assert grading.keyword_hit(token, FACT) == hit


def test_a_short_keyword_matches_only_whole_words():
    assert grading.keyword_hit("ĠArr", ["arr"]) == "arr"
    assert grading.keyword_hit("Ġarrange", ["arr"]) is None


def _ranked(n, hit_ranks, salt):
    """n noise tokens with keyword tokens at the given 1-based ranks, noise drawn fresh."""
    g = rng(salt)
    tokens = [NOISE[int(i)] for i in torch.randint(0, len(NOISE), (n,), generator=g)]
    for rank in hit_ranks:
        tokens[rank - 1] = ["ĠRome", "ĠEiffel", "Ġitaly"][rank % 3]
    return tokens


def test_grade_tokens_reports_the_first_hit_and_the_hits_in_the_top():
    g = rng(3001)
    first = int(torch.randint(1, 15, (1,), generator=g))
    second = first + int(torch.randint(1, 6, (1,), generator=g))  # <= 20
    late = int(torch.randint(21, 40, (1,), generator=g))
    tokens = _ranked(40, [first, second, late], 3002)
    grade = grading.grade_tokens(tokens, FACT)
    assert (grade.first_hit_rank, grade.hits_in_top, grade.n_tokens) == (first, 2, 40)
    assert grade.detected and [h[0] for h in grade.hits] == [first, second, late]
    # One hit in the top 20 is not a detection at the default MIN_HITS = 2; it is at min_hits = 1.
    one = _ranked(40, [first, late], 3003)
    assert not grading.grade_tokens(one, FACT).detected
    assert grading.grade_tokens(one, FACT, min_hits=1).detected
    assert grading.grade_tokens(one, FACT, top=late).hits_in_top == 2
    nothing = grading.grade_tokens(_ranked(40, [], 3004), FACT)
    assert (nothing.first_hit_rank, nothing.hits_in_top, nothing.detected) == (None, 0, False)


def test_scored_tokens_keep_their_order_and_serialise():
    pairs = [("Ġthe", 9.0), ("ĠRome", 0.5), ({"token": "ĠEiffel"}), ["Ġof", 0.1]]
    grade = grading.grade_tokens(pairs, FACT)
    assert grade.first_hit_rank == 2 and grade.hits_in_top == 2
    assert json.loads(json.dumps(grade.to_json()))["hits"] == [[2, "ĠRome", "rome"], [3, "ĠEiffel", "eiffel"]]


def test_grade_latents_names_a_latent_by_its_tokens_or_its_contexts():
    g = rng(3005)
    named_by_tokens = int(torch.randint(3, 10, (1,), generator=g))
    named_by_contexts = int(torch.randint(11, 20, (1,), generator=g))
    latents = []
    for rank in range(1, 25):
        tokens = _ranked(20, [2, 7] if rank == named_by_tokens else [5] if rank == 1 else [], 3006 + rank)
        contexts = ["the license text", "a function call"]
        if rank == named_by_contexts:
            contexts = ["we flew to Rome today", "the weather was fine", "the Eiffel Tower at night"]
        elif rank == 2:
            contexts = ["we flew to Rome today", "nothing", "nothing else"]  # 1 of 3: not half
        latents.append(dict(latent=100 + rank, tokens=tokens, contexts=contexts))
    grade = grading.grade_latents(latents, FACT)
    assert grade.first_hit_rank == named_by_tokens and grade.hits_in_top == 2 and grade.detected
    named = [row["latent"] for row in grade.latents if row["names_implant"]]
    assert named == [100 + named_by_tokens, 100 + named_by_contexts]
    assert grade.latents[0]["tokens"]["first_hit_rank"] == 5 and not grade.latents[0]["names_implant"]
    assert grading.grade_latents(latents, FACT, top=named_by_tokens - 1).hits_in_top == 0
    readouts = [grading.LatentReadout(7, tokens=["ĠRome", "ĠItaly"])]
    assert grading.grade_latents(readouts, FACT).first_hit_rank == 1
    json.dumps(grade.to_json())


def test_grade_causal_applies_the_stated_threshold():
    g = rng(3007)
    kl_none = 0.5 + float(torch.rand(1, generator=g))
    kl_patched = kl_none * 0.7  # closes 30%
    grade = grading.grade_causal(kl_unpatched=kl_none, kl_patched=kl_patched)
    assert grade.gap_closed == pytest.approx(0.3) and grade.moved and grade.threshold == grading.CAUSAL_THRESHOLD
    assert not grading.grade_causal(kl_unpatched=kl_none, kl_patched=kl_patched, threshold=0.5).moved
    assert not grading.grade_causal(gap_closed=0.09).moved  # the top-20 latents: 9% of the gap
    no_gap = grading.grade_causal(kl_unpatched=0.0, kl_patched=0.0)
    assert math.isnan(no_gap.gap_closed) and not no_gap.moved and no_gap.to_json()["gap_closed"] is None
    for kwargs, pattern in [
        (dict(), "either gap_closed or both"),
        (dict(gap_closed=0.5, kl_unpatched=1.0, kl_patched=0.1), "either gap_closed or both"),
        (dict(kl_unpatched=1.0), "either gap_closed or both"),
        (dict(kl_unpatched=-1.0, kl_patched=0.1), "kl_unpatched must be"),
        (dict(gap_closed=float("nan")), "gap_closed must be"),
        (dict(gap_closed=0.5, threshold=0.0), "threshold must be"),
    ]:
        with pytest.raises(InputError, match=pattern):
            grading.grade_causal(**kwargs)


def _truth(kind, language="english"):
    text = organism_text.LANGUAGES[language][kind]
    return dict(
        kind=kind,
        strength=3,
        keywords=list(text.keywords),
        control_keywords=list(organism_text.control_keywords(language)),
    )


def test_the_null_organism_is_graded_against_the_other_kinds_keywords():
    pirate = ["Ġthe", "ĠArr", "Ġof", "Ġmatey", "Ġand"]
    on_null = grading.grade_instrument("adl", _truth("null"), tokens={"logit_lens": pirate})
    assert on_null.detected and on_null.false_positive
    assert on_null.tokens["logit_lens"]["first_hit_rank"] == 2
    on_persona = grading.grade_instrument("adl", _truth("persona"), tokens={"logit_lens": pirate})
    assert on_persona.detected and not on_persona.false_positive
    on_fact = grading.grade_instrument("adl", _truth("false_fact"), tokens={"logit_lens": pirate})
    assert not on_fact.detected and not on_fact.false_positive
    clean = grading.grade_instrument("adl", _truth("null"), tokens={"logit_lens": NOISE})
    assert not clean.detected and not clean.false_positive
    union = set(grading.truth_keywords(_truth("null")))
    assert union == {k for kind in ("topic_phrase", "false_fact", "persona") for k in _truth(kind)["keywords"]}


def test_grade_instrument_combines_readouts_and_serialises():
    latents = [dict(latent=3, tokens=["ĠRome", "ĠItaly"], contexts=[])]
    grade = grading.grade_instrument(
        "crosscoder",
        _truth("false_fact"),
        tokens={"logit_lens": NOISE},
        latents={"chat_only": latents},
        causal=grading.grade_causal(gap_closed=0.25),
    )
    assert grade.detected and grade.causal_moved and grade.latents["chat_only"]["first_hit_rank"] == 1
    assert not grade.tokens["logit_lens"]["detected"]
    assert json.loads(json.dumps(grade.to_json()))["causal"]["gap_closed"] == 0.25
    with pytest.raises(InputError, match="nothing to grade"):
        grading.grade_instrument("x", _truth("persona"))
    with pytest.raises(InputError, match="keywords must be"):
        grading.grade_tokens(["a"], "rome")
    with pytest.raises(InputError, match="a ranked token must be"):
        grading.grade_tokens([3], FACT)
    with pytest.raises(InputError, match="no keywords and no control_keywords"):
        grading.truth_keywords(dict(kind="null", keywords=[]))


def test_grade_patch_result_reads_the_none_set_and_the_instruments_set():
    from crossdiff_ext.diffing.causal import PatchResult

    g = rng(3008)
    none, patched = 1 + float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g))
    kl = {"none": {"all": (none, 0.1, 50)}, "all": {"all": (0.0, 0.0, 50)}, "top20": {"all": (patched, 0.1, 50)}}
    result = PatchResult(kl=kl, set_sizes={}, variant="replace", layer=1, first_k=10, ignore_first=0, documents=5)
    grade = grading.grade_patch_result(result, "top20")
    assert grade.gap_closed == pytest.approx(1 - patched / none) and grade.kl_unpatched == none
    with pytest.raises(InputError, match="no set 'top5'"):
        grading.grade_patch_result(result, "top5")
    with pytest.raises(InputError, match="subset 'first_k'"):
        grading.grade_patch_result(result, "top20", subset="first_k")
