"""Make DUO a selectable vLLM attention backend and declare its variables."""

from __future__ import annotations

import os

from vllm_duo._vllm import AttentionBackendEnum, envs, init_logger, register_backend
from vllm_duo.settings import ENV_VARS

logger = init_logger("vllm." + __name__)

DUO_CLASS_PATH = "vllm_duo.backend.DuoAttentionBackend"


def declare_env_vars() -> None:
    """Tell vLLM about VLLM_DUO_* so it does not warn about unknown variables."""
    for name in ENV_VARS:
        envs.environment_variables.setdefault(name, lambda name=name: os.getenv(name))


def duo_backend_enum() -> AttentionBackendEnum:
    """Register DUO as an alias of the CUSTOM slot and return that member.

    A brand-new enum member would not survive pickling into the spawned engine
    and worker processes (they unpickle the config before loading plugins);
    CUSTOM is a built-in member, so ``--attention-backend DUO`` pickles as
    CUSTOM and resolves to DUO's class once the plugin has run there too.
    """
    member = AttentionBackendEnum.CUSTOM
    if member.is_overridden() and member.get_path() != DUO_CLASS_PATH:
        raise RuntimeError(
            f"AttentionBackendEnum.CUSTOM is already taken by {member.get_path()}; "
            "vllm-duo needs that slot for --attention-backend DUO. Uninstall the other plugin "
            "or set VLLM_PLUGINS to load only one of them."
        )
    register_backend(member, DUO_CLASS_PATH)
    AttentionBackendEnum._member_map_.setdefault("DUO", member)
    return member
