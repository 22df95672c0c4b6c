"""Helpers shared by the ``vllm-duo`` subcommands: output, parsing, flag validation.

The two output helpers are the only places of the command line that print. Nothing here
imports vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn, TextIO

from vllm_duo.errors import DuoConfigError
from vllm_duo.settings import (
    ENV_PATTERN,
    ENV_RECENT,
    ENV_SINK,
    ENV_SPARSITY,
    ENV_THRESHOLD,
    MAX_TOKENS,
    DuoSettings,
)

PROG = "vllm-duo"
DEFAULT_CONTEXT = 8192

# Flag <-> environment variable of the same setting, so DuoSettings does the validation and
# its messages are rewritten to name the flag the user actually typed.
_FLAG_ENV = {
    "sparsity": ENV_SPARSITY,
    "threshold": ENV_THRESHOLD,
    "sink": ENV_SINK,
    "recent": ENV_RECENT,
}
INT_RE = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------------------------
# Output helpers (the only places that print)
# --------------------------------------------------------------------------------------------


def out(line: str = "") -> None:
    """Write one line of command output to stdout."""
    print(line, file=sys.stdout)


class _StderrAtEmit(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made, so redirection (pytest's capsys, contextlib.redirect_stderr) still sees the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


@contextlib.contextmanager
def library_log(level: int = logging.INFO) -> Iterator[None]:
    """While a long command (calibrate) runs, its ``vllm_duo`` log lines reach the terminal:
    one ``INFO hh:mm:ss message`` line each on stderr. Undone on exit, so commands run later
    in the same process (tests) print only what they print themselves."""
    library = logging.getLogger("vllm_duo")
    handler = _StderrAtEmit()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%H:%M:%S"))
    previous = library.level
    library.addHandler(handler)
    library.setLevel(min(level, library.getEffectiveLevel()))
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(previous)


def error_line(message: str) -> None:
    """Write the single ``vllm-duo: error: ...`` line to stderr (newlines folded)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{PROG}: error: {text}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A command-line syntax error found by argparse; reported like any other bad input."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become :class:`UsageError` instead of usage + exit.

    Subparsers inherit the class, so every level reports errors the same one-line way.
    """

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block and exiting."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_option(
    parser: argparse.ArgumentParser,
    field: str,
    kind: type,
    metavar: str,
    text: str,
    default: object,
) -> None:
    """``--field-name`` for a config dataclass field, its default shown in the help."""
    parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=default,
                        metavar=metavar, help=f"{text} (default {default})")  # fmt: skip


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


# --------------------------------------------------------------------------------------------
# Flag validation (through DuoSettings, messages rewritten to name the flags)
# --------------------------------------------------------------------------------------------


def flag_text(flag: str, raw: str) -> str:
    """``--flag=value`` as a user would type it (quoted only where a shell would need it)."""
    return f"--{flag}={shlex.quote(raw)}"


def settings_from_flags(flags: dict[str, str | None]) -> DuoSettings:
    """Validate the given flag values exactly as the ``VLLM_DUO_*`` variables are validated.

    ``flags`` maps flag names (``sparsity``, ``threshold``, ``sink``, ``recent``) to the raw
    text the user passed, or None when the flag was not given.
    """
    given = {flag: raw for flag, raw in flags.items() if raw is not None}
    for flag, raw in given.items():
        # from_env treats a blank value as unset; a blank flag is a mistake, not a default.
        if not raw.strip():
            kind = "a float in [0, 1]" if flag in ("sparsity", "threshold") else "an integer"
            raise DuoConfigError(f"{flag_text(flag, raw)} is empty: expected {kind}.")
    env = {_FLAG_ENV[flag]: raw for flag, raw in given.items()}
    try:
        return DuoSettings.from_env(env)
    except DuoConfigError as exc:
        message = str(exc)
        for flag, raw in given.items():
            var = _FLAG_ENV[flag]
            message = message.replace(f"{var}={raw!r}", flag_text(flag, raw))
        for flag, var in _FLAG_ENV.items():
            message = message.replace(var, f"--{flag}")
        raise DuoConfigError(message) from None


def parse_context(raw: str | None) -> int:
    """The ``--context`` value: a base-10 integer in [1, MAX_TOKENS]."""
    if raw is None:
        return DEFAULT_CONTEXT
    text = raw.strip()
    if not INT_RE.fullmatch(text):
        raise DuoConfigError(
            f"{flag_text('context', raw)} is not a base-10 integer: expected a context length "
            f"in tokens, an integer >= 1; example: --context=32768."
        )
    value = int(text)
    if not 1 <= value <= MAX_TOKENS:
        raise DuoConfigError(
            f"{flag_text('context', raw)} is out of range: expected an integer in "
            f"[1, {MAX_TOKENS}] (context length in tokens)."
        )
    return value


def parse_token_counts(flag: str, raw: str) -> tuple[int, ...]:
    """``--FLAG 4K,8K,32768`` -> (4096, 8192, 32768)."""
    values = []
    for part in raw.split(","):
        text = part.strip().upper()
        scale = 1024 if text.endswith("K") else 1
        digits = text[:-1] if scale > 1 else text
        if not INT_RE.fullmatch(digits):
            raise DuoConfigError(
                f"{flag_text(flag, raw)}: {part.strip()!r} is not a token count; "
                "expected comma-separated integers, optionally with K (x1024), e.g. 4K,8K,32768."
            )
        values.append(int(digits) * scale)
    return tuple(values)


def pattern_message(message: str, spec: str) -> str:
    """Rewrite a resolve_pattern message about ``VLLM_DUO_PATTERN`` for the positional arg."""
    message = message.replace(f"{ENV_PATTERN}={spec!r}", f"pattern {spec!r}")
    message = message.replace(
        f"set {ENV_PATTERN} to a bundled pattern name", "pass a bundled pattern name"
    )
    return message.replace(" or to a directory containing", " or a directory containing")
