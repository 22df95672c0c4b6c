"""Validate DUO settings in the process that builds the engine config (see the ledger).

Without this, a bad ``VLLM_DUO_*`` value is first noticed while the worker
builds the model; with a spawned engine core the user then reads vLLM's
generic "Engine core initialization failed" instead of our one-line reason.
The hook is the running platform's ``check_and_update_config`` (CPU or CUDA).
"""

from __future__ import annotations

from vllm_duo._vllm import current_platform

_PLATFORM = type(current_platform)
_ORIGINAL = _PLATFORM.check_and_update_config.__func__
_MARK = "_vllm_duo_patched"


def _check_and_update_config(cls, vllm_config) -> None:
    _ORIGINAL(cls, vllm_config)
    from vllm_duo.patches.cpu_platform import is_duo

    attention_config = getattr(vllm_config, "attention_config", None)
    if attention_config is not None and is_duo(attention_config.backend):
        from vllm_duo.model_plan import plan_for
        from vllm_duo.settings import kernels_from_env

        plan_for(vllm_config)
        kernels_from_env()


def apply() -> None:
    if getattr(_PLATFORM.check_and_update_config, _MARK, False):
        return
    setattr(_check_and_update_config, _MARK, True)
    _PLATFORM.check_and_update_config = classmethod(_check_and_update_config)


def still_needed() -> bool:
    """True while backends get no config-time validation hook."""
    from vllm_duo._vllm import AttentionBackend

    return not hasattr(AttentionBackend, "validate_vllm_config")
