"""A grader that needs no LLM: score what a diffing instrument reports against an organism's recorded truth.

Inputs are plain, so any instrument can feed it: a ranked list of tokens (strings, or (string, score) pairs; the
list's order is the rank, scores are carried along), a ranked list of latents each with its own readouts (the
logit-lens tokens of its fine-tuned decoder row, its top activating contexts), and a causal effect (the fraction
of the KL gap that patching the instrument's latents closes).

Matching rules (one function, keyword_hit):
  - normalise: Unicode NFKC; the sub-word markers of common tokenizers ("Ġ", "▁", "Ċ", a leading "##") become
    spaces; lower case; the text is split into words at every non-alphanumeric character and at camelCase
    boundaries ("RecipeSteps" -> "recipe", "steps");
  - a word hits a keyword when it equals it, or when the shorter of the two has at least MIN_PREFIX (4) characters
    and is a prefix of the longer ("eiff" of "eiffel", "cook" of "cooking", "recipes" for "recipe");
  - a token (or context) hits when one of its words hits one of the keywords.
Detection rules (stated thresholds, all overridable):
  - tokens: an instrument detects the implant when at least MIN_HITS (2) of its top TOP (20) tokens hit: one hit
    in 20 can be chance, the null organism measures how often;
  - latents: a latent names the implant when its token readout detects it (the rule above) or at least half of its
    top contexts hit; the instrument detects the implant when one of its top TOP latents names it;
  - causal: patching moves the fine-tuned behaviour when it closes at least CAUSAL_THRESHOLD (0.2) of the KL gap.
The null organism has no keywords: it is graded against the union of the other kinds' keywords (its truth's
control_keywords), and any detection there is a false positive.
"""

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from ..diffing.causal import PatchResult
from ..errors import InputError

MIN_PREFIX = 4
TOP = 20
MIN_HITS = 2
CAUSAL_THRESHOLD = 0.2
_MARKERS = re.compile(r"^##|[\u0120\u2581\u010a]")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_WORD = re.compile(r"[^\W_]+")

Token = Union[str, tuple[str, float], Sequence[Any]]


def normalise(text: str) -> list[str]:
    """The words of a token or text, as the grader compares them (see the module docstring).

    Args:
        text: A token string (with its tokenizer's markers) or any text.

    Returns:
        Its lower-case alphanumeric words.
    """
    text = _MARKERS.sub(" ", unicodedata.normalize("NFKC", text))
    text = _CAMEL.sub(" ", text)
    return [w.lower() for w in _WORD.findall(text)]


def _word_hits(word: str, keyword: str) -> bool:
    if word == keyword:
        return True
    short, long = sorted((word, keyword), key=len)
    return len(short) >= MIN_PREFIX and long.startswith(short)


def keyword_hit(text: str, keywords: Iterable[str]) -> Optional[str]:
    """The first keyword a token or text hits, or None.

    Args:
        text: A token or a context.
        keywords: The truth's keywords (each may hold several words: each word is matched on its own).

    Returns:
        The keyword hit, or None.
    """
    words = normalise(text)
    for keyword in keywords:
        if any(_word_hits(w, k) for k in normalise(keyword) for w in words):
            return keyword
    return None


def _token_text(token: Token) -> str:
    if isinstance(token, str):
        return token
    if isinstance(token, Mapping) and "token" in token:
        return str(token["token"])
    if isinstance(token, Sequence) and token and isinstance(token[0], str):
        return token[0]
    raise InputError(f"a ranked token must be a string, a (string, score) pair or {{'token': ...}}, got {token!r:.80}")


@dataclass
class TokenGrade:
    """How a ranked token list scores against keywords.

    Attributes:
        first_hit_rank: 1-based rank of the first token that hits a keyword (None: no hit at all).
        hits_in_top: Tokens among the first `top` that hit.
        top: The cut-off (TOP unless given).
        n_tokens: Tokens graded.
        detected: hits_in_top >= min_hits.
        min_hits: The detection threshold.
        hits: (rank, token, keyword) of every hit in the whole list.
    """

    first_hit_rank: Optional[int]
    hits_in_top: int
    top: int
    n_tokens: int
    detected: bool
    min_hits: int
    hits: list[tuple[int, str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def grade_tokens(
    tokens: Sequence[Token], keywords: Sequence[str], *, top: int = TOP, min_hits: int = MIN_HITS
) -> TokenGrade:
    """Score a ranked token list: the rank of the first keyword hit, the hits in the top `top`.

    Args:
        tokens: Ranked tokens, best first: strings, (string, score) pairs or {"token": ...} dicts.
        keywords: The truth's keywords (an organism's Organism.keywords).
        top: The cut-off for hits_in_top.
        min_hits: Hits in the top `top` that count as a detection.

    Returns:
        The TokenGrade.

    Raises:
        InputError: No keywords, top or min_hits < 1, or a token of another type.
    """
    _check_grading(keywords, top, min_hits)
    hits = []
    for rank, token in enumerate(tokens, start=1):
        text = _token_text(token)
        keyword = keyword_hit(text, keywords)
        if keyword is not None:
            hits.append((rank, text, keyword))
    in_top = sum(rank <= top for rank, _, _ in hits)
    return TokenGrade(
        first_hit_rank=hits[0][0] if hits else None,
        hits_in_top=in_top,
        top=top,
        n_tokens=len(tokens),
        detected=in_top >= min_hits,
        min_hits=min_hits,
        hits=hits,
    )


def _check_grading(keywords, top, min_hits):
    if isinstance(keywords, str) or not keywords or not all(isinstance(k, str) and normalise(k) for k in keywords):
        raise InputError(f"keywords must be a non-empty list of words, got {keywords!r:.80}")
    for name, value in (("top", top), ("min_hits", min_hits)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class LatentReadout:
    """What an instrument says about one latent.

    Attributes:
        latent: Its id.
        tokens: The logit-lens tokens of its fine-tuned decoder row, best first.
        contexts: Its top activating contexts (text), best first.
    """

    latent: int
    tokens: Sequence[Token] = ()
    contexts: Sequence[str] = ()


@dataclass
class LatentGrade:
    """How a ranked latent list scores against keywords.

    Attributes:
        first_hit_rank: 1-based rank of the first latent that names the implant (None: none does).
        hits_in_top: Latents among the first `top` that name it.
        top: The cut-off.
        n_latents: Latents graded.
        detected: hits_in_top >= 1.
        latents: Per latent: id, rank, its TokenGrade (as a dict), its contexts that hit, whether it names it.
    """

    first_hit_rank: Optional[int]
    hits_in_top: int
    top: int
    n_latents: int
    detected: bool
    latents: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def grade_latents(
    latents: Sequence[Union[LatentReadout, Mapping[str, Any]]],
    keywords: Sequence[str],
    *,
    top: int = TOP,
    min_hits: int = MIN_HITS,
) -> LatentGrade:
    """Score a ranked latent list: a latent names the implant when its token readout detects it (grade_tokens) or
    at least half of its contexts hit a keyword.

    Args:
        latents: Ranked latents, best first: LatentReadout or dicts with "latent", "tokens", "contexts".
        keywords: The truth's keywords.
        top: The cut-off, both for each latent's tokens and for the latents.
        min_hits: Token hits in a latent's top `top` that name the implant.

    Returns:
        The LatentGrade.

    Raises:
        InputError: As grade_tokens; or a latent entry of another shape.
    """
    _check_grading(keywords, top, min_hits)
    rows = []
    for rank, entry in enumerate(latents, start=1):
        readout = _readout(entry)
        tokens = grade_tokens(readout.tokens, keywords, top=top, min_hits=min_hits)
        context_hits = [c for c in readout.contexts if keyword_hit(c, keywords) is not None]
        by_context = bool(readout.contexts) and 2 * len(context_hits) >= len(readout.contexts)
        rows.append(
            dict(
                latent=readout.latent,
                rank=rank,
                tokens=tokens.to_json(),
                contexts_hit=len(context_hits),
                contexts=len(readout.contexts),
                names_implant=tokens.detected or by_context,
            )
        )
    named = [r["rank"] for r in rows if r["names_implant"]]
    in_top = sum(rank <= top for rank in named)
    return LatentGrade(
        first_hit_rank=named[0] if named else None,
        hits_in_top=in_top,
        top=top,
        n_latents=len(rows),
        detected=in_top >= 1,
        latents=rows,
    )


def _readout(entry):
    if isinstance(entry, LatentReadout):
        return entry
    if isinstance(entry, Mapping) and "latent" in entry:
        contexts = entry.get("contexts", ())
        if isinstance(contexts, str) or not all(isinstance(c, str) for c in contexts):
            raise InputError(f"latent {entry['latent']}: contexts must be a list of strings")
        return LatentReadout(int(entry["latent"]), entry.get("tokens", ()), contexts)
    raise InputError(f"a ranked latent must be a LatentReadout or a dict with 'latent', got {entry!r:.80}")


@dataclass
class CausalGrade:
    """Whether patching an instrument's latents moves the fine-tuned behaviour.

    Attributes:
        gap_closed: The fraction of the KL gap closed: 1 - KL(P_ft || P_patched) / KL(P_ft || P_unpatched).
        threshold: The fraction that counts as moving the behaviour.
        moved: gap_closed >= threshold.
        kl_unpatched: KL(P_ft || P_unpatched), when given.
        kl_patched: KL(P_ft || P_patched), when given.
    """

    gap_closed: float
    threshold: float
    moved: bool
    kl_unpatched: Optional[float] = None
    kl_patched: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (None for a NaN gap)."""
        out = asdict(self)
        out["gap_closed"] = None if math.isnan(self.gap_closed) else self.gap_closed
        return out


def grade_causal(
    *,
    gap_closed: Optional[float] = None,
    kl_unpatched: Optional[float] = None,
    kl_patched: Optional[float] = None,
    threshold: float = CAUSAL_THRESHOLD,
) -> CausalGrade:
    """Score a causal measurement: given the fraction of the KL gap closed, or the two KLs it comes from (e.g.
    diffing.causal.patch_kl's "none" set and the instrument's set, on the organism's data).

    Args:
        gap_closed: The fraction closed (exclusive with the KLs).
        kl_unpatched: KL(P_ft || P) with nothing patched (the base activations in the fine-tuned model's rest).
        kl_patched: KL(P_ft || P) with the instrument's latents patched in.
        threshold: The fraction that counts as moving the behaviour (CAUSAL_THRESHOLD).

    Returns:
        The CausalGrade (gap NaN, moved False, when the unpatched KL is 0: there was no gap to close).

    Raises:
        InputError: Neither or both ways given, a negative or non-finite KL, or a threshold outside (0, 1].
    """
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise InputError(f"threshold must be in (0, 1], got {threshold!r}")
    if (gap_closed is None) == (kl_unpatched is None or kl_patched is None) or (
        gap_closed is not None and (kl_unpatched is not None or kl_patched is not None)
    ):
        raise InputError("give either gap_closed or both kl_unpatched and kl_patched")
    if gap_closed is None:
        for name, value in (("kl_unpatched", kl_unpatched), ("kl_patched", kl_patched)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        gap_closed = 1 - kl_patched / kl_unpatched if kl_unpatched > 0 else math.nan
    elif not (isinstance(gap_closed, (int, float)) and math.isfinite(gap_closed)):
        raise InputError(f"gap_closed must be a finite number, got {gap_closed!r}")
    gap = float(gap_closed)
    return CausalGrade(gap, float(threshold), bool(gap >= threshold), kl_unpatched, kl_patched)


def grade_patch_result(
    result: PatchResult, latent_set: str, *, subset: str = "all", threshold: float = CAUSAL_THRESHOLD
) -> CausalGrade:
    """grade_causal on a diffing.causal.patch_kl result: the set's mean KL against the "none" set's (nothing
    patched), on one subset of the scored positions.

    Args:
        result: What patch_kl returned (run on the organism's data, with the fine-tune as the chat model).
        latent_set: The name of the instrument's latent set in it.
        subset: The scored positions ("all", "first_k", "rest").
        threshold: As grade_causal.

    Returns:
        The CausalGrade.

    Raises:
        InputError: The set or subset is not in the result, or it scored no position.
    """
    for name in ("none", latent_set):
        if name not in result.kl or subset not in result.kl[name]:
            raise InputError(f"the patch result has no set {name!r} with subset {subset!r} (sets: {list(result.kl)})")
        if result.kl[name][subset][2] == 0:
            raise InputError(f"the patch result's set {name!r} scored no position in subset {subset!r}")
    return grade_causal(
        kl_unpatched=result.kl["none"][subset][0], kl_patched=result.kl[latent_set][subset][0], threshold=threshold
    )


def truth_keywords(truth: Mapping[str, Any]) -> list[str]:
    """The keywords an organism is graded against: its own, or for the null organism its control keywords (the
    union of the other kinds' keywords).

    Args:
        truth: An organism's truth (Organism.truth).

    Returns:
        The keywords.

    Raises:
        InputError: The truth has neither.
    """
    keywords = list(truth.get("keywords") or truth.get("control_keywords") or [])
    if not keywords:
        raise InputError(f"the {truth.get('kind', '?')} organism's truth has no keywords and no control_keywords")
    return keywords


@dataclass
class InstrumentGrade:
    """One instrument's output graded against one organism.

    Attributes:
        instrument: The instrument's name.
        kind: The organism's kind.
        strength: The organism's strength.
        tokens: {readout name: TokenGrade as a dict} (e.g. "logit_lens", "patchscope", "logit_diff").
        latents: {readout name: LatentGrade as a dict}.
        causal: CausalGrade as a dict, or None.
        detected: Any token or latent readout detected the keywords (for the null organism: a false positive).
        causal_moved: The causal grade's verdict, or None.
        false_positive: detected on the null organism (always False on the others).
    """

    instrument: str
    kind: str
    strength: Optional[int]
    tokens: dict[str, dict[str, Any]]
    latents: dict[str, dict[str, Any]]
    causal: Optional[dict[str, Any]]
    detected: bool
    causal_moved: Optional[bool]
    false_positive: bool

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def grade_instrument(
    instrument: str,
    truth: Mapping[str, Any],
    *,
    tokens: Optional[Mapping[str, Sequence[Token]]] = None,
    latents: Optional[Mapping[str, Sequence[Union[LatentReadout, Mapping[str, Any]]]]] = None,
    causal: Optional[CausalGrade] = None,
    top: int = TOP,
    min_hits: int = MIN_HITS,
) -> InstrumentGrade:
    """Grade all of one instrument's readouts on one organism.

    Args:
        instrument: Its name (recorded).
        truth: The organism's truth (Organism.truth).
        tokens: {readout name: ranked tokens}.
        latents: {readout name: ranked latents}.
        causal: A grade_causal result, or None.
        top: The cut-off (TOP).
        min_hits: Token hits that count as a detection (MIN_HITS).

    Returns:
        The InstrumentGrade: on the null organism every detection is a false positive.

    Raises:
        InputError: Nothing to grade, or bad inputs (see grade_tokens, grade_latents).
    """
    if not tokens and not latents and causal is None:
        raise InputError(f"instrument {instrument!r}: nothing to grade (no tokens, latents or causal result)")
    keywords = truth_keywords(truth)
    token_grades = {name: grade_tokens(t, keywords, top=top, min_hits=min_hits) for name, t in (tokens or {}).items()}
    latent_grades = {
        name: grade_latents(ls, keywords, top=top, min_hits=min_hits) for name, ls in (latents or {}).items()
    }
    detected = any(g.detected for g in token_grades.values()) or any(g.detected for g in latent_grades.values())
    return InstrumentGrade(
        instrument=instrument,
        kind=str(truth.get("kind")),
        strength=truth.get("strength"),
        tokens={name: g.to_json() for name, g in token_grades.items()},
        latents={name: g.to_json() for name, g in latent_grades.items()},
        causal=causal.to_json() if causal is not None else None,
        detected=detected,
        causal_moved=causal.moved if causal is not None else None,
        false_positive=detected and truth.get("kind") == "null",
    )
