"""vllm-duo: DuoAttention (retrieval + streaming heads) as a vLLM attention backend.

Select it with ``--attention-backend DUO`` or ``LLM(..., attention_backend="DUO")``.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM general-plugin entry point: declare variables, register DUO, apply patches.

    Idempotent and cheap; vLLM calls it in every process it starts.
    """
    global _registered
    if _registered:
        return
    from vllm_duo import patches, registration
    from vllm_duo.streaming_cache import register_streaming_spec

    registration.declare_env_vars()
    registration.duo_backend_enum()
    register_streaming_spec()
    patches.apply_all()
    _registered = True
