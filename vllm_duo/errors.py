"""Error type shared by the whole project.

Every problem caused by user input (environment variables, pattern files, command-line
arguments, a model that does not fit its pattern) is raised as :class:`DuoConfigError`. Its
message is one line that names the variable or file, the bad value, what is allowed, and how to
fix it, so it reads well both in a traceback and in a server log.
"""

from __future__ import annotations

__all__ = ["DuoConfigError"]


class DuoConfigError(ValueError):
    """Bad configuration or input for vllm-duo.

    Subclasses ``ValueError`` so that callers which already handle ``ValueError`` for bad
    arguments (argument parsers, vLLM's config validation) treat it the same way.
    """
