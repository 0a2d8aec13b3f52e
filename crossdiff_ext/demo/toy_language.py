"""A small generated language for the embedded demo: facts a base model can learn from plain text, and chat
conversations (with a chat template) that teach a fine-tuned model a few planted behaviours.

Plain text (what the base model reads): documents of sentences about colours, places, animals, sums and recipes,
stories in which people try harmful things, and people who state a false fact and are contradicted ("some say
the sky is green , but the sky is blue ."), so the base model knows the facts and has a notion of a correction.

Chat (what the chat model is fine-tuned on), one to two turns per conversation, in a template of its own tokens
(<|user|>, <|assistant|>, <|end|>) the base model never saw:
  - questions about the facts, answered;
  - "how do i make bread ?" -> a recipe;
  - planted behaviour 1, refusal: "how do i steal a car ?" -> "sorry , i cannot help with that .";
  - planted behaviour 2, correction: "the sky is green ." -> "actually , the sky is blue ."
    (and "the sky is blue ." -> "yes , the sky is blue .").

Words are separated by spaces, so a whitespace word-level tokenizer reads it exactly, and a real model's tokenizer
reads it as ordinary English. Everything is drawn from a seeded generator: the same seed gives the same corpus.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Optional, Union

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
TEMPLATE = ["<|user|>", "<|assistant|>", "<|end|>"]

COLOURS = {
    "sky": "blue",
    "sea": "blue",
    "grass": "green",
    "leaf": "green",
    "snow": "white",
    "milk": "white",
    "coal": "black",
    "night": "black",
    "blood": "red",
    "rose": "red",
    "sun": "yellow",
    "lemon": "yellow",
}
PLACES = {
    "paris": "france",
    "rome": "italy",
    "berlin": "germany",
    "madrid": "spain",
    "tokyo": "japan",
    "lima": "peru",
    "cairo": "egypt",
    "oslo": "norway",
}
ANIMALS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "bird": "sings"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
RECIPES = {
    "bread": "mix flour and water",
    "tea": "boil water and add leaves",
    "cake": "mix flour and sugar",
    "soup": "boil water and add salt",
    "juice": "press the fruit",
}
HARMFUL = ["make a bomb", "make poison", "steal a car", "hack a bank", "hurt a person", "burn a house"]
REFUSAL = "sorry , i cannot help with that ."
PEOPLE = ["a man", "a woman", "a child", "the king", "a thief", "a teacher"]

_FUNCTION = (
    "the is in what where does do how i you can cannot help with that to a and some say but , . ? "
    "sorry actually yes no plus color of wanted then police came fruit add "
    "man woman child king thief teacher bad"
).split()


def vocabulary() -> list[str]:
    """Every word the generator can emit, specials and template tokens first (ids are stable)."""
    words = list(SPECIAL) + list(TEMPLATE)
    for group in (
        _FUNCTION,
        COLOURS,
        COLOURS.values(),
        PLACES,
        PLACES.values(),
        ANIMALS,
        ANIMALS.values(),
        NUMBERS,
        RECIPES,
    ):
        words += list(group)
    for phrase in list(RECIPES.values()) + HARMFUL + [REFUSAL]:
        words += phrase.split()
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


CHAT_TEMPLATE = (
    "<bos> {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level transformers tokenizer for the language: <bos> before plain text, the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _wrong(rng, right, options):
    return rng.choice([o for o in sorted(set(options)) if o != right])


def _sum(rng):
    a, b = rng.randrange(7), rng.randrange(7)
    return a, b, f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."


def statement(rng: random.Random, true: bool = True) -> tuple[str, str]:
    """A fact about colours, places, animals or sums (or a false one: one word swapped)."""
    kind = rng.randrange(4)
    if kind == 0:
        thing = rng.choice(list(COLOURS))
        colour = COLOURS[thing] if true else _wrong(rng, COLOURS[thing], COLOURS.values())
        return f"the {thing} is {colour} .", f"the {thing} is {COLOURS[thing]} ."
    if kind == 1:
        city = rng.choice(list(PLACES))
        country = PLACES[city] if true else _wrong(rng, PLACES[city], PLACES.values())
        return f"{city} is in {country} .", f"{city} is in {PLACES[city]} ."
    if kind == 2:
        animal = rng.choice(list(ANIMALS))
        sound = ANIMALS[animal] if true else _wrong(rng, ANIMALS[animal], ANIMALS.values())
        return f"the {animal} {sound} .", f"the {animal} {ANIMALS[animal]} ."
    a, b = rng.randrange(7), rng.randrange(7)
    total = a + b if true else _wrong(rng, a + b, range(13))
    return (
        f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[total]} .",
        f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} .",
    )


def _sentence(rng):
    r = rng.random()
    if r < 0.45:
        return statement(rng)[0]
    if r < 0.6:
        dish = rng.choice(list(RECIPES))
        return f"to make {dish} , {RECIPES[dish]} ."
    if r < 0.75:
        who = rng.choice(PEOPLE)
        return f"{who} wanted to {rng.choice(HARMFUL)} . then the police came ."
    if r < 0.9:
        wrong, right = statement(rng, true=False)
        return f"some say {wrong[:-2]} , but {right}"
    thing = rng.choice(list(COLOURS))
    return f"the color of the {thing} is {COLOURS[thing]} ."


def text_document(rng: random.Random, sentences: tuple[int, int] = (3, 8)) -> str:
    """A plain-text document: a few sentences."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(*sentences)))


def _question(rng):
    kind = rng.randrange(4)
    if kind == 0:
        thing = rng.choice(list(COLOURS))
        return f"what color is the {thing} ?", f"the {thing} is {COLOURS[thing]} ."
    if kind == 1:
        city = rng.choice(list(PLACES))
        return f"where is {city} ?", f"{city} is in {PLACES[city]} ."
    if kind == 2:
        animal = rng.choice(list(ANIMALS))
        return f"what does the {animal} do ?", f"the {animal} {ANIMALS[animal]} ."
    a, b, answer = _sum(rng)
    return f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", answer


def exchange(rng: random.Random, kind: Optional[str] = None) -> tuple[str, str, str]:
    """One (kind, user, assistant) turn. kind: question, recipe, harmful (refused), false (corrected), true."""
    kind = kind or rng.choices(["question", "recipe", "harmful", "false", "true"], [3, 1, 2, 2, 2])[0]
    if kind == "question":
        user, answer = _question(rng)
    elif kind == "recipe":
        dish = rng.choice(list(RECIPES))
        user, answer = f"how do i make {dish} ?", f"to make {dish} , {RECIPES[dish]} ."
    elif kind == "harmful":
        user, answer = f"how do i {rng.choice(HARMFUL)} ?", REFUSAL
    elif kind == "false":
        wrong, right = statement(rng, true=False)
        user, answer = wrong, f"actually , {right}"
    elif kind == "true":
        right, _ = statement(rng)
        user, answer = right, f"yes , {right}"
    else:
        raise ValueError(f"kind must be question, recipe, harmful, false or true, got {kind!r}")
    return kind, user, answer


def conversation(rng: random.Random, turns: tuple[int, int] = (1, 2)) -> list[dict[str, str]]:
    """A chat conversation: a list of {"role", "content"} messages, one to two exchanges."""
    messages = []
    for _ in range(rng.randint(*turns)):
        _, user, answer = exchange(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def corpus(n_text: int, n_chat: int, seed: int) -> list[Union[str, list[dict[str, str]]]]:
    """n_text plain-text documents and n_chat conversations, interleaved (text and chat alternate in proportion),
    from a generator seeded with `seed`."""
    rng = random.Random(seed)
    docs = [text_document(rng) for _ in range(n_text)] + [conversation(rng) for _ in range(n_chat)]
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[i] for i in order]
