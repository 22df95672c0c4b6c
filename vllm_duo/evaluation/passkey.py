"""Passkey retrieval cases: a number hidden in filler text at a given depth.

Pure and deterministic: the same (length, depth, seed) always gives the same case.
The prompt is a chat turn whose assistant reply is primed with "The pass key is", so
greedy decoding answers with the number directly and scoring is a substring test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
INSTRUCTION = "Find the pass key hidden in the text below."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    """One question: the prompt text, the expected key, and where it was hidden."""

    length: int
    depth: float
    passkey: str
    prompt: str

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth={self.depth!r}: expected a fraction in [0, 1]")

    def correct(self, answer: str) -> bool:
        """Whether the model's reply contains the key (and not a longer number around it)."""
        digits = "".join(ch if ch.isdigit() else " " for ch in answer).split()
        return self.passkey in digits


def make_case(
    tokenizer: Any, length: int, depth: float, seed: int, passkey: str | None = None
) -> PasskeyCase:
    """A chat prompt of about ``length`` tokens with a 5-digit key at ``depth`` of the filler.

    The key is drawn from ``seed`` unless ``passkey`` is given.
    """
    if passkey is None:
        passkey = str(random.Random(f"{seed}-{length}-{depth}").randrange(10000, 100000))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    filler_tokens = len(tokenizer.encode(FILLER, add_special_tokens=False))
    frame = f"{INSTRUCTION}\n\n{needle}\n\n{QUESTION} {ANSWER_PREFIX}"
    overhead = len(tokenizer.encode(frame, add_special_tokens=False)) + 40  # chat template
    repeats = max(1, (length - overhead) // filler_tokens)
    before = round(repeats * depth)
    haystack = FILLER * before + needle + " " + FILLER * (repeats - before)
    content = f"{INSTRUCTION}\n\n{haystack.strip()}\n\n{QUESTION}"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return PasskeyCase(length=length, depth=depth, passkey=passkey, prompt=chat + ANSWER_PREFIX)
