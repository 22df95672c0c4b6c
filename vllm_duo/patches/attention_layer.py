"""Attach per-KV-head caches to DUO attention layers (see the ledger)."""

from __future__ import annotations

import functools

from vllm_duo._vllm import Attention

_ORIGINAL_INIT = Attention.__init__
_MARK = "_vllm_duo_patched"


@functools.wraps(_ORIGINAL_INIT)
def _init(self, *args, **kwargs) -> None:
    _ORIGINAL_INIT(self, *args, **kwargs)
    from vllm_duo.backend import DuoAttentionImpl

    if isinstance(getattr(self, "impl", None), DuoAttentionImpl):
        from vllm_duo.companion import attach_head_caches

        attach_head_caches(self)


def apply() -> None:
    if getattr(Attention.__init__, _MARK, False):
        return
    setattr(_init, _MARK, True)
    Attention.__init__ = _init


def still_needed() -> bool:
    """True while backends have no hook to declare several KV caches per layer."""
    from vllm_duo._vllm import AttentionBackend

    return not any(
        hasattr(AttentionBackend, hook)
        for hook in ("get_layer_kv_cache_specs", "get_extra_kv_cache_layers")
    )
