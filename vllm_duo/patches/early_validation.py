"""Validate DUO settings in the process that builds the engine config (see the ledger).

Without this, a bad ``VLLM_DUO_*`` value is first noticed while the worker
builds the model; with a spawned engine core the user then reads vLLM's
generic "Engine core initialization failed" instead of our one-line reason.
The hook is the running platform's ``check_and_update_config`` (CPU or CUDA).
"""

from __future__ import annotations

from typing import Any

from vllm_duo._vllm import running_platform

_MARK = "_vllm_duo_patched"
_ORIGINAL: dict[type, Any] = {}
"""The unwrapped classmethod function, per platform class patched."""


def _check_and_update_config(cls, vllm_config) -> None:
    original = next(f for klass, f in _ORIGINAL.items() if issubclass(cls, klass))
    original(cls, vllm_config)
    from vllm_duo.patches.cpu_platform import is_duo

    attention_config = getattr(vllm_config, "attention_config", None)
    if attention_config is not None and is_duo(attention_config.backend):
        from vllm_duo.model_plan import plan_for
        from vllm_duo.settings import kernels_from_env

        plan_for(vllm_config)
        kernels_from_env()


def apply() -> None:
    # The platform vLLM runs on in this process, looked up now (not at import).
    platform = type(running_platform())
    if getattr(platform.check_and_update_config, _MARK, False):
        return
    _ORIGINAL[platform] = platform.check_and_update_config.__func__
    setattr(_check_and_update_config, _MARK, True)
    platform.check_and_update_config = classmethod(_check_and_update_config)


def still_needed() -> bool:
    """True while backends get no config-time validation hook."""
    from vllm_duo._vllm import AttentionBackend

    return not hasattr(AttentionBackend, "validate_vllm_config")
