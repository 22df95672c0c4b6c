"""Needle-in-a-haystack cases: a key hidden in natural text at a given depth, and scoring.

A *family* fixes everything about the prompts but the length, depth and seed: the haystack
text, the needle sentence, the key format, the instruction, the question and the words that
prime the answer. Three families, built so that one never shares its text or wording with
another:

- ``calibration``: the prompts ``vllm-duo calibrate`` trains on (the Python language
  reference, ``The pass key is NNNNN. Remember it.``, the same question), with one key. Its
  results are *in-distribution* numbers.
- ``dev``: standard-library docstrings, a 6-digit access code, other wording. For debugging
  the harness and trying settings; never reported as a result.
- ``heldout``: Newton's *Opticks*, RULER-style wording ("special magic number for WORD"),
  a 7-digit key tied to a word. Calibration never sees its text, wording or key format, and
  nothing is tuned on it: the numbers that judge a pattern.

A case is built directly in token ids (template head, instruction, haystack sentences with
the needle between two of them, question, template middle, answer primer), so its length is
exact and the needle's position known. Pure and deterministic: standard library only, and the
same (family, length, depth, seed, index) always gives the same case.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from vllm_duo.evaluation.texts import SOURCES, SentencePool

__all__ = ["FAMILIES", "PasskeyCase", "PromptFamily", "build_cases", "first_number", "make_case"]

# Words that name a held-out key ("the special magic number for <word>").
_KEY_WORDS = (
    "amber",
    "anchor",
    "badger",
    "beacon",
    "cedar",
    "cobalt",
    "comet",
    "copper",
    "coral",
    "falcon",
    "fern",
    "glacier",
    "harbor",
    "hazel",
    "heron",
    "indigo",
    "ivory",
    "jasper",
    "juniper",
    "lantern",
    "maple",
    "marble",
    "meadow",
    "nectar",
    "obsidian",
    "orchid",
    "otter",
    "pebble",
    "quartz",
    "raven",
    "saffron",
    "sequoia",
    "thistle",
    "tundra",
    "velvet",
    "willow",
)

_NUMBER = re.compile(r"[0-9]+(?:,[0-9]{3})*")

# Placeholders spliced into the chat template to find where the user and assistant text go.
_USER_MARK = "@@VLLM_DUO_USER@@"
_ANSWER_MARK = "@@VLLM_DUO_ANSWER@@"


@dataclass(frozen=True)
class PromptFamily:
    """How the prompts of one family are worded.

    Attributes:
        name: the family's name.
        source: the text source of the haystack (:data:`vllm_duo.evaluation.texts.SOURCES`).
        digits: digits of the key.
        instruction: text before the haystack ("" for none).
        needle: the sentence that holds the key; ``{key}`` and ``{word}`` are filled in.
        question: asked after the haystack; may use ``{word}``.
        primer: the start of the assistant's reply, so greedy decoding answers at once
            ("" to let the model start the reply itself); may use ``{word}``.
        keyed_by_word: whether each key is tied to a word the question names.
    """

    name: str
    source: str
    digits: int
    instruction: str
    needle: str
    question: str
    primer: str
    keyed_by_word: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"family {self.name!r}: unknown text source {self.source!r}")
        if not 3 <= self.digits <= 12:
            raise ValueError(f"family {self.name!r}: digits={self.digits} not in [3, 12]")
        if "{key}" not in self.needle:
            raise ValueError(f"family {self.name!r}: the needle has no {{key}}")
        uses_word = any("{word}" in s for s in (self.needle, self.question, self.primer))
        if uses_word != self.keyed_by_word:
            raise ValueError(f"family {self.name!r}: {{word}} must appear iff keyed_by_word")


FAMILIES: dict[str, PromptFamily] = {
    family.name: family
    for family in (
        PromptFamily(
            name="calibration",
            source="python-reference",
            digits=5,
            instruction="",
            needle=" The pass key is {key}. Remember it.",
            question="What is the pass key hidden in the text above?",
            primer="",
        ),
        PromptFamily(
            name="dev",
            source="stdlib-docstrings",
            digits=6,
            instruction="Read the documentation below and remember the access code in it.",
            needle=" Note: the access code is {key}.",
            question="What is the access code mentioned in the documentation?",
            primer="The access code is",
        ),
        PromptFamily(
            name="heldout",
            source="newton-opticks",
            digits=7,
            instruction=(
                "A special magic number is hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the number afterwards."
            ),
            needle=" One of the special magic numbers for {word} is: {key}.",
            question="What is the special magic number for {word} mentioned in the provided text?",
            primer="The special magic number for {word} mentioned in the provided text is",
            keyed_by_word=True,
        ),
    )
}


def first_number(text: str) -> str | None:
    """The first number in ``text`` as its digits, or None when there is none.

    Thousands separators are dropped (``"is 1,234,567."`` -> ``"1234567"``) because models
    sometimes write long keys that way; ``"12345, 67890"`` is two numbers.
    """
    match = _NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


@dataclass(frozen=True)
class PasskeyCase:
    """One question: the prompt's token ids, the expected key and where it was hidden.

    Attributes:
        family: the family's name.
        length: the prompt's length in tokens (``len(prompt_ids)``).
        depth: where the needle sits in the haystack, as a fraction of its tokens.
        key: the expected answer (digits).
        word: the word the key is tied to ("" when the family has none).
        index: which case of its (length, depth) cell this is.
        prompt_ids: the prompt, ending with the answer primer.
        needle_position: token index of the needle's first token in ``prompt_ids``.
    """

    family: str
    length: int
    depth: float
    key: str
    word: str
    index: int
    prompt_ids: tuple[int, ...]
    needle_position: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth={self.depth!r}: expected a fraction in [0, 1]")
        if not self.key.isdigit():
            raise ValueError(f"key={self.key!r}: expected digits")
        if self.prompt_ids and len(self.prompt_ids) != self.length:
            raise ValueError(f"length={self.length} but the prompt has {len(self.prompt_ids)}")

    def correct(self, answer: str) -> bool:
        """Whether the first number of the model's reply is the key, exactly."""
        return first_number(answer) == self.key

    def to_dict(self) -> dict[str, Any]:
        """The case without its token ids (for result files)."""
        return {
            "family": self.family,
            "length": self.length,
            "depth": self.depth,
            "key": self.key,
            "word": self.word,
            "index": self.index,
            "needle_position": self.needle_position,
        }


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


class _Builder:
    """Token pieces of one family for one tokenizer (the haystack tokenized once)."""

    def __init__(self, tokenizer: Any, family: PromptFamily) -> None:
        self.tokenizer = tokenizer
        self.family = family
        self.pool = SentencePool(tokenizer, family.source)
        self.head, self.middle = _frame(tokenizer)
        # A blank line between the instruction and the haystack, as a person would write it.
        self.instruction = _ids(
            tokenizer, family.instruction + "\n\n" if family.instruction else ""
        )

    def case(self, length: int, depth: float, seed: int, index: int) -> PasskeyCase:
        family, tok = self.family, self.tokenizer
        rng = random.Random(f"vllm-duo-niah:{family.name}:{seed}:{length}:{depth!r}:{index}")
        key = str(rng.randrange(10 ** (family.digits - 1), 10**family.digits))
        word = rng.choice(_KEY_WORDS) if family.keyed_by_word else ""
        needle = _ids(tok, family.needle.format(key=key, word=word))
        question = _ids(tok, "\n\n" + family.question.format(word=word))
        primer = _ids(tok, family.primer.format(word=word))
        fixed = len(self.head) + len(self.instruction) + len(needle) + len(question)
        fixed += len(self.middle) + len(primer)
        budget = length - fixed
        if budget < 16:
            raise ValueError(
                f"a {length}-token {family.name} prompt leaves {budget} tokens of haystack "
                f"(the frame takes {fixed}): use lengths of at least {fixed + 16}"
            )
        sentences = self.pool.run(rng.randrange(len(self.pool)), budget)
        # The needle goes between two sentences: the boundary nearest to depth * budget.
        boundaries = [0]
        for sentence in sentences:
            boundaries.append(boundaries[-1] + len(sentence))
        target = depth * budget
        slot = min(range(len(boundaries)), key=lambda i: (abs(boundaries[i] - target), i))
        ids = list(self.head) + list(self.instruction)
        for sentence in sentences[:slot]:
            ids.extend(sentence)
        needle_position = len(ids)
        ids.extend(needle)
        for sentence in sentences[slot:]:
            ids.extend(sentence)
        ids.extend(question)
        ids.extend(self.middle)
        ids.extend(primer)
        return PasskeyCase(
            family=family.name,
            length=len(ids),
            depth=depth,
            key=key,
            word=word,
            index=index,
            prompt_ids=tuple(ids),
            needle_position=needle_position,
        )


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before the user text and between the user text and the assistant's reply.

    Uses the chat template when the tokenizer has one, else a plain ``Answer:`` layout.
    """
    if not getattr(tokenizer, "chat_template", None):
        bos = getattr(tokenizer, "bos_token_id", None)
        return ([] if bos is None else [int(bos)]), _ids(tokenizer, "\nAnswer: ")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _USER_MARK}, {"role": "assistant", "content": _ANSWER_MARK}],
        tokenize=False,
    )
    head, rest = rendered.split(_USER_MARK)
    return _ids(tokenizer, head), _ids(tokenizer, rest.split(_ANSWER_MARK)[0])


_BUILDERS: dict[tuple[int, str], _Builder] = {}


def _builder(tokenizer: Any, family: str) -> _Builder:
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is unknown: expected one of {', '.join(FAMILIES)}")
    key = (id(tokenizer), family)
    if key not in _BUILDERS or _BUILDERS[key].tokenizer is not tokenizer:
        _BUILDERS[key] = _Builder(tokenizer, FAMILIES[family])
    return _BUILDERS[key]


def make_case(
    tokenizer: Any, family: str, length: int, depth: float, seed: int, index: int = 0
) -> PasskeyCase:
    """The case ``index`` of family ``family`` with exactly ``length`` tokens at ``depth``.

    ``depth`` is the fraction of the haystack's tokens before the needle (0 = right after the
    instruction, 1 = right before the question); the needle goes to the nearest sentence
    boundary, and the case records the depth reached.

    Raises:
        ValueError: an unknown family, a depth outside [0, 1] or a length too short for the
            family's frame.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: expected a fraction in [0, 1]")
    return _builder(tokenizer, family).case(length, depth, seed, index)


def build_cases(
    tokenizer: Any,
    family: str,
    lengths: tuple[int, ...],
    depths: tuple[float, ...],
    seed: int,
    per_cell: int = 1,
) -> list[PasskeyCase]:
    """Every (length, depth, index) case of a grid, lengths outermost."""
    return [
        make_case(tokenizer, family, length, depth, seed, index)
        for length in lengths
        for depth in depths
        for index in range(per_cell)
    ]
