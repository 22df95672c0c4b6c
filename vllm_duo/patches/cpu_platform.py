"""Let ``--attention-backend DUO`` through vLLM's CPU platform (see the ledger)."""

from __future__ import annotations

from vllm_duo._vllm import AttentionBackendEnum, CpuPlatform
from vllm_duo.errors import DuoConfigError

_ORIGINAL = CpuPlatform.__dict__["get_attn_backend_cls"]
_MARK = "_vllm_duo_patched"


def is_duo(selected_backend: object) -> bool:
    """Whether the user selected DUO (an alias of the CUSTOM slot, see registration)."""
    if selected_backend is None:
        return False
    try:
        from vllm_duo.registration import DUO_CLASS_PATH

        return (
            isinstance(selected_backend, AttentionBackendEnum)
            and selected_backend.get_path() == DUO_CLASS_PATH
        )
    except ValueError:  # CUSTOM slot not registered
        return False


def _get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
    if is_duo(selected_backend):
        from vllm_duo.registration import DUO_CLASS_PATH

        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            raise DuoConfigError(
                "--attention-backend DUO cannot serve MLA or sparse attention layers "
                f"({attn_selector_config!r}); use the stock backend for this model."
            )
        return DUO_CLASS_PATH
    return _ORIGINAL.__func__(cls, selected_backend, attn_selector_config, num_heads)


def apply() -> None:
    if getattr(CpuPlatform.get_attn_backend_cls, _MARK, False):
        return
    setattr(_get_attn_backend_cls, _MARK, True)
    CpuPlatform.get_attn_backend_cls = classmethod(_get_attn_backend_cls)


def still_needed() -> bool:
    """True while the unpatched platform ignores a registered DUO selection."""
    import torch

    from vllm_duo._vllm import AttentionSelectorConfig
    from vllm_duo.registration import DUO_CLASS_PATH, duo_backend_enum

    config = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype=None,
                                     block_size=None)  # fmt: skip
    return _ORIGINAL.__func__(CpuPlatform, duo_backend_enum(), config) != DUO_CLASS_PATH
