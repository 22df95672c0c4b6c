"""Synthetic multi-passkey prompts for DuoAttention calibration, generated offline.

Every prompt is a haystack with several pass keys hidden at random depths
(``"The pass key is NNNNN. Remember it."``), then a question asking for them and the answer
(the pass keys in order, ``"12345, 67890, 13579"``). Heads that must look far back to copy a
pass key into the answer are the retrieval heads DuoAttention's optimisation finds; the
calibration loss is taken at the answer tokens.

The haystack is natural text by default: a run of consecutive sentences, from a random
sentence on, of an offline text source (:mod:`vllm_duo.evaluation.texts`; ``vllm-duo
calibrate`` uses the Python language reference), as the paper hides its keys in book text.
``haystack="generated"`` gives the short generated filler sentences of the first calibrations.

The prompt is assembled directly in token ids, segment by segment (template head, filler
sentences, pass-key sentences, question, template middle, answer), each segment tokenized on
its own with the model's tokenizer. That makes the length exact (every prompt has exactly the
requested number of tokens, so a batch needs no padding) and the answer positions known
without searching. With a chat template the question is the user turn and the answer the
assistant turn; without one a plain ``Question: ... Answer:`` layout is used.

Pure and deterministic: standard library only (no torch, no vLLM). A sample depends only on
``(seed, step, index)`` through string-seeded :class:`random.Random` instances (stable across
Python versions and platforms), never on global random state, so a resumed calibration sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_duo.errors import DuoConfigError
from vllm_duo.evaluation.texts import SOURCES, SentencePool

__all__ = [
    "GENERATED",
    "LENGTH_DISTS",
    "PASSKEY_DIGITS",
    "PasskeyDataset",
    "PasskeySample",
    "TokenizerLike",
    "filler_sentence",
]

PASSKEY_DIGITS = 5
"""Digits per pass key (``10000`` to ``99999``)."""

GENERATED = "generated"
"""Haystack of generated filler sentences (the first calibrations); else a text source name."""

LENGTH_DISTS = ("uniform", "log-uniform")
"""How a step's prompt length is drawn from ``[min_len, max_len]``."""

# Pass keys are hidden between MIN_DEPTH and MAX_DEPTH of the filler (fractions of its tokens).
MIN_DEPTH, MAX_DEPTH = 0.05, 0.95

# Placeholders spliced into the chat template to find where the user and assistant text go.
_USER_MARK = "@@VLLM_DUO_USER@@"
_ANSWER_MARK = "@@VLLM_DUO_ANSWER@@"

# Sentences are tokenized in chunks of this many (one fast-tokenizer batch call each).
_SENTENCE_CHUNK = 64

_SUBJECTS = (
    "the old farmer",
    "a young teacher",
    "the river",
    "my neighbour",
    "the little dog",
    "a quiet student",
    "the captain",
    "her brother",
    "the small village",
    "a travelling merchant",
    "the baker",
    "the committee",
    "an engineer",
    "the gardener",
    "our team",
    "the wind",
    "a grey cat",
    "the lighthouse keeper",
    "the children",
    "the orchestra",
)
_VERBS = (
    "walked past",
    "painted",
    "remembered",
    "carried",
    "looked at",
    "built",
    "found",
    "talked about",
    "followed",
    "cleaned",
    "repaired",
    "visited",
    "described",
    "ignored",
    "opened",
    "measured",
    "watched",
    "planted",
    "sold",
    "borrowed",
)
_OBJECTS = (
    "the wooden bridge",
    "a blue boat",
    "the garden wall",
    "an empty basket",
    "the market square",
    "a long letter",
    "the kitchen table",
    "the northern road",
    "a pile of books",
    "the bell tower",
    "a basket of apples",
    "the stone well",
    "the broken fence",
    "a map of the coast",
    "the red barn",
    "the evening train",
    "a jar of honey",
    "the school yard",
    "a copper kettle",
    "the harbour",
)
_TAILS = (
    "before sunrise",
    "in the rain",
    "after lunch",
    "without a word",
    "for the third time",
    "near the hills",
    "with great care",
    "at the end of the week",
    "on a cold morning",
    "while the bells rang",
    "under a clear sky",
    "as the tide came in",
    "in late autumn",
    "during the festival",
    "with a smile",
    "once again",
)
_EXTRAS = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is warm.",
    "Here we go.",
    "There and back again.",
    "Nobody was surprised.",
    "It was an ordinary day.",
    "Everyone went home early.",
    "The story goes on.",
    "Nothing else happened.",
)


class TokenizerLike(Protocol):
    """What the generator needs from a Hugging Face tokenizer."""

    chat_template: Any
    bos_token_id: int | None

    def __call__(self, text: Any, *, add_special_tokens: bool = ...) -> Any:
        """Tokenize ``text`` (a string or a list of strings); ``["input_ids"]`` holds the ids."""
        ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """Render a conversation with the model's chat template."""
        ...


@dataclass(frozen=True)
class PasskeySample:
    """One calibration prompt.

    Attributes:
        input_ids: the prompt, exactly the requested length T, ending with the answer.
        answer_positions: positions in ``input_ids`` of the answer tokens (the pass keys as
            listed in the answer), ascending. The hidden state that *predicts* the answer token
            at position p sits at p - 1; the calibration loss is taken there.
        passkeys: the hidden pass keys in order of appearance.
        passkey_positions: position of the first token of each pass-key sentence.
    """

    input_ids: tuple[int, ...]
    answer_positions: tuple[int, ...]
    passkeys: tuple[str, ...]
    passkey_positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.answer_positions:
            raise ValueError("a passkey sample needs at least one answer position")
        if self.answer_positions[0] < 1 or self.answer_positions[-1] >= len(self.input_ids):
            raise ValueError(
                f"answer positions {self.answer_positions[0]}..{self.answer_positions[-1]} are "
                f"outside [1, {len(self.input_ids)})"
            )
        if len(self.passkeys) != len(self.passkey_positions):
            raise ValueError("passkeys and passkey_positions differ in length")

    @property
    def loss_positions(self) -> tuple[int, ...]:
        """Positions whose hidden states predict the answer tokens (``answer_positions - 1``)."""
        return tuple(p - 1 for p in self.answer_positions)


def filler_sentence(rng: random.Random) -> str:
    """One short filler sentence, e.g. ``"The baker repaired a blue boat before sunrise."``."""
    if rng.random() < 0.15:
        return rng.choice(_EXTRAS)
    subject = rng.choice(_SUBJECTS)
    text = f"{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        text += f" {rng.choice(_TAILS)}"
    return text[0].upper() + text[1:] + "."


def _ids(encoding: Any) -> list[int]:
    """``input_ids`` of a tokenizer result as a plain list (a dict-like or a BatchEncoding)."""
    return list(encoding["input_ids"])


class PasskeyDataset:
    """Deterministic stream of multi-passkey prompts built with one tokenizer.

    Args:
        tokenizer: the model's tokenizer (Hugging Face API). Its chat template is used when it
            has one.
        min_len, max_len: prompt lengths in tokens, drawn uniformly in ``[min_len, max_len]``
            once per step (all prompts of a batch share the length, so no padding is needed).
        num_passkeys: pass keys hidden per prompt (the answer lists all of them in order).
        seed: the data seed.
        haystack: a text source name (natural text) or ``"generated"`` (filler sentences).
        length_dist: ``"uniform"`` or ``"log-uniform"`` in ``[min_len, max_len]``.

    Raises:
        DuoConfigError: ``min_len`` too small to hold the question, the pass keys and the
            answer with this tokenizer (the message names ``--min-len``).
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        *,
        min_len: int,
        max_len: int,
        num_passkeys: int,
        seed: int,
        haystack: str = "generated",
        length_dist: str = "uniform",
    ) -> None:
        if num_passkeys < 1:
            raise DuoConfigError(f"--passkeys={num_passkeys} must be an integer >= 1.")
        if not 1 <= min_len <= max_len:
            raise DuoConfigError(
                f"--min-len={min_len} and --max-len={max_len}: need 1 <= --min-len <= --max-len."
            )
        if length_dist not in LENGTH_DISTS:
            raise DuoConfigError(
                f"--length-dist={length_dist!r} is invalid: expected one of "
                f"{', '.join(LENGTH_DISTS)}."
            )
        if haystack != GENERATED and haystack not in SOURCES:
            raise DuoConfigError(
                f"--haystack={haystack!r} is invalid: expected {GENERATED} or a text source "
                f"({', '.join(SOURCES)})."
            )
        self._tokenizer = tokenizer
        self.haystack = haystack
        self.length_dist = length_dist
        # Natural text: every sentence of the source tokenized once, runs of them per prompt.
        self._pool = SentencePool(tokenizer, haystack) if haystack != GENERATED else None
        self.min_len = min_len
        self.max_len = max_len
        self.num_passkeys = num_passkeys
        self.seed = seed
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self._head, self._middle = self._frame()
        self._passkey_prefix = _ids(tokenizer(" The pass key is ", add_special_tokens=False))
        self._passkey_suffix = _ids(tokenizer(". Remember it.", add_special_tokens=False))
        question = (
            "What is the pass key hidden in the text above?"
            if num_passkeys == 1
            else "What are the pass keys hidden in the text above? List them in order, "
            "separated by commas."
        )
        prefix = "\n\n" if self.uses_chat_template else "\n\nQuestion: "
        self._question = _ids(tokenizer(prefix + question, add_special_tokens=False))
        # The longest fixed part: every pass key and answer number at PASSKEY_DIGITS tokens
        # (byte-level tokenizers never need more than one token per digit).
        worst = (
            len(self._head)
            + len(self._middle)
            + len(self._question)
            + num_passkeys * (len(self._passkey_prefix) + len(self._passkey_suffix))
            + 2 * num_passkeys * (PASSKEY_DIGITS + 1)
        )
        self.min_supported_len = worst + 8
        if min_len < self.min_supported_len:
            raise DuoConfigError(
                f"--min-len={min_len} is too short for {num_passkeys} pass key(s) with this "
                f"tokenizer: the question, pass keys and answer alone take up to {worst} "
                f"tokens; use --min-len >= {self.min_supported_len} (or fewer --passkeys)."
            )

    # ----------------------------------------------------------------------------------------
    # Template
    # ----------------------------------------------------------------------------------------

    def _frame(self) -> tuple[list[int], list[int]]:
        """Token ids before the user text and between the user text and the answer."""
        tok = self._tokenizer
        if not self.uses_chat_template:
            bos = getattr(tok, "bos_token_id", None)
            head = [] if bos is None else [int(bos)]
            return head, _ids(tok("\nAnswer:", add_special_tokens=False))
        rendered = tok.apply_chat_template(
            [
                {"role": "user", "content": _USER_MARK},
                {"role": "assistant", "content": _ANSWER_MARK},
            ],
            tokenize=False,
        )
        if not isinstance(rendered, str) or rendered.count(_USER_MARK) != 1:
            raise DuoConfigError(
                "the model's chat template does not render a user message verbatim; calibrate "
                "needs a template that keeps the message text."
            )
        head_text, rest = rendered.split(_USER_MARK)
        if rest.count(_ANSWER_MARK) != 1:
            raise DuoConfigError(
                "the model's chat template does not render an assistant message verbatim; "
                "calibrate needs a template that keeps the message text."
            )
        middle_text = rest.split(_ANSWER_MARK)[0]
        head = _ids(tok(head_text, add_special_tokens=False)) if head_text else []
        return head, _ids(tok(middle_text, add_special_tokens=False))

    # ----------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------

    def length_for_step(self, step: int) -> int:
        """Prompt length T of every sample of ``step``: uniform in ``[min_len, max_len]``."""
        rng = random.Random(f"vllm-duo-passkey:{self.seed}:length:{step}")
        if self.length_dist == "log-uniform":
            # Each doubling of the length gets the same share of steps: long prompts, which
            # cost quadratically more, still come up without dominating the run time.
            value = math.exp(rng.uniform(math.log(self.min_len), math.log(self.max_len)))
            return min(self.max_len, max(self.min_len, round(value)))
        return rng.randint(self.min_len, self.max_len)

    def batch(self, step: int, batch_size: int) -> list[PasskeySample]:
        """The ``batch_size`` samples of ``step``, all of length :meth:`length_for_step`."""
        length = self.length_for_step(step)
        return [self.sample(length, step, index) for index in range(batch_size)]

    def sample(self, length: int, step: int, index: int) -> PasskeySample:
        """Sample ``index`` of ``step`` with exactly ``length`` tokens.

        Raises:
            DuoConfigError: ``length`` cannot hold the fixed parts (names ``--min-len``).
        """
        rng = random.Random(f"vllm-duo-passkey:{self.seed}:sample:{step}:{index}")
        tok = self._tokenizer
        lo, hi = 10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS
        passkeys = [str(k) for k in rng.sample(range(lo, hi), self.num_passkeys)]
        key_ids = [_ids(tok(k, add_special_tokens=False)) for k in passkeys]
        answer_text = ", ".join(passkeys)
        answer_prefix = " " if not self.uses_chat_template else ""
        answer = _ids(tok(answer_prefix + answer_text, add_special_tokens=False))
        sentences = [self._passkey_prefix + ids + self._passkey_suffix for ids in key_ids]

        fixed = (
            len(self._head)
            + sum(len(s) for s in sentences)
            + len(self._question)
            + len(self._middle)
            + len(answer)
        )
        budget = length - fixed
        if budget < 0:
            raise DuoConfigError(
                f"a {length}-token prompt cannot hold {self.num_passkeys} pass key(s), the "
                f"question and the answer ({fixed} tokens): raise --min-len."
            )
        filler = self._filler(rng, budget)
        # Sentence boundaries inside the filler (token offsets) where a pass key may go.
        boundaries = [0]
        for chunk in filler:
            boundaries.append(boundaries[-1] + len(chunk))
        depths = sorted(rng.uniform(MIN_DEPTH, MAX_DEPTH) for _ in passkeys)
        slots = [_nearest(boundaries, depth * budget) for depth in depths]

        ids: list[int] = list(self._head)
        positions: list[int] = []
        next_key = 0
        for sentence_no in range(len(filler) + 1):
            while next_key < len(slots) and slots[next_key] == sentence_no:
                positions.append(len(ids))
                ids.extend(sentences[next_key])
                next_key += 1
            if sentence_no < len(filler):
                ids.extend(filler[sentence_no])
        ids.extend(self._question)
        ids.extend(self._middle)
        start = len(ids)
        ids.extend(answer)
        if len(ids) != length:  # pragma: no cover - guarded by the arithmetic above
            raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
        return PasskeySample(
            input_ids=tuple(ids),
            answer_positions=tuple(range(start, start + len(answer))),
            passkeys=tuple(passkeys),
            passkey_positions=tuple(positions),
        )

    def _filler(self, rng: random.Random, budget: int) -> list[list[int]]:
        """Filler sentences (token ids) totalling exactly ``budget`` tokens.

        The last sentence is cut to fit; sentence boundaries are where pass keys can go. With a
        natural-text haystack the sentences are a run of the source from a random sentence on.
        """
        if self._pool is not None:
            return self._pool.run(rng.randrange(len(self._pool)), budget)
        sentences: list[list[int]] = []
        total = 0
        while total < budget:
            texts = [filler_sentence(rng) for _ in range(_SENTENCE_CHUNK)]
            # Sentences follow each other with a space; the very first starts the user text.
            texts = [t if not sentences and i == 0 else " " + t for i, t in enumerate(texts)]
            for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]:
                ids = list(ids)[: budget - total]
                if ids:
                    sentences.append(ids)
                    total += len(ids)
                if total >= budget:
                    break
        return sentences


def _nearest(boundaries: Sequence[int], target: float) -> int:
    """Index of the boundary closest to ``target`` (the lower one on a tie)."""
    best = 0
    for i, value in enumerate(boundaries):
        if abs(value - target) < abs(boundaries[best] - target):
            best = i
    return best
