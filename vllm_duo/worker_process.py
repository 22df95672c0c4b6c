"""One engine in a child process: the way ``vllm-duo bench`` and ``vllm-duo eval`` run vLLM.

Each measurement gets a fresh process (a clean engine, no state shared between backends or
methods) that appends JSON lines to a results file; the parent polls it for progress.

Pure: never imports vLLM (the child does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["read_rows", "run_worker"]


def run_worker(
    module: str,
    args: list[str],
    *,
    log_path: Path,
    env_for: Callable[[Path], Mapping[str, str]],
    on_poll: Callable[[], None],
    what: str,
) -> None:
    """Runs ``python -m module *args`` to the end, its output in ``log_path``.

    ``env_for(tmp)`` gives the child's environment for a fresh temporary directory (removed
    afterwards); ``on_poll`` is called every second while it runs and once at the end. If
    the parent is interrupted (Ctrl-C, SIGTERM) the child is stopped too. Raises
    RuntimeError naming ``what``, the exit status and the log's last lines if the child
    fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # vLLM's IPC socket paths must stay under 107 bytes, so the temp dir is short.
    tmp = Path(tempfile.mkdtemp(prefix="vdw", dir="/tmp" if os.path.isdir("/tmp") else None))
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env_for(tmp)),
            )
            try:
                while process.poll() is None:
                    time.sleep(1.0)
                    on_poll()
            finally:
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        process.kill()
            on_poll()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(
            f"the {what} failed (exit {process.returncode}); log {log_path}, last lines:\n{tail}"
        )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a worker appended so far (none if it has not started).

    A last line without its newline is one being written (or torn by a kill): left out.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines if line.strip()]
