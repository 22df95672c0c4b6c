"""The ``vllm-duo`` command line.

Subcommands, one module each:

- ``vllm-duo patterns list|show`` (:mod:`vllm_duo.cli.patterns`): the bundled patterns, and the
  retrieval/streaming split of one pattern with the KV-cache saving it buys.
- ``vllm-duo calibrate MODEL_DIR --out DIR`` (:mod:`vllm_duo.cli.calibrate`): learn a pattern
  for a local model (:mod:`vllm_duo.calibration`; torch and transformers, not vLLM).
- ``vllm-duo bench`` (:mod:`vllm_duo.cli.bench`): DUO against the stock backend.
- ``vllm-duo eval MODEL_DIR`` (:mod:`vllm_duo.cli.eval`): long-context accuracy of a pattern
  (heat maps, sparsity sweep, agreement with full attention).

Shared output and parsing helpers live in :mod:`vllm_duo.cli.common`. Commands that need an
engine import it inside their own handler (or in a worker process), never at module level, so
``patterns`` works on a machine without vLLM.

Every problem with the user's input is reported as one line ``vllm-duo: error: <message>`` on
stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import os
import sys

from vllm_duo import __version__
from vllm_duo.cli import bench, calibrate, patterns
from vllm_duo.cli import eval as eval_command
from vllm_duo.cli.common import PROG, Parser, UsageError, error_line
from vllm_duo.errors import DuoConfigError

__all__ = ["main"]


def _build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="DuoAttention for vLLM: inspect, calibrate, evaluate and benchmark patterns.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (patterns, calibrate, bench, eval_command):
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``vllm-duo`` command line; returns the exit status.

    0 on success, 2 for any bad input (one ``vllm-duo: error: ...`` line on stderr).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        # The command as typed, for result files that record how they were made.
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return int(args.handler(args))
    except SystemExit as exc:  # --help and --version exit through argparse
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except UsageError as exc:
        error_line(str(exc))
        return 2
    except DuoConfigError as exc:
        error_line(str(exc))
        return 2
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except OSError as exc:
        error_line(f"{exc.filename or 'I/O'}: {exc.strerror or exc}")
        return 2
