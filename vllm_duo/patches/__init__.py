"""The ledger of every change vllm-duo makes to vLLM at run time.

Each patch lives in its own module and is listed here with its target, why it
exists, how it works and when it can go. ``apply_all`` runs once per process:
vLLM loads plugins in the API server, the engine core and every worker.
``tests/test_patches.py`` checks each ``still_needed`` probe, so a patch whose
reason disappears in a new vLLM fails the suite instead of lingering.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from vllm_duo.patches import attention_layer, cpu_platform, early_validation


@dataclass(frozen=True)
class Patch:
    """One monkeypatch of vLLM, with its reasons."""

    name: str
    target: str
    why: str
    how: str
    remove_when: str
    apply: Callable[[], None]
    still_needed: Callable[[], bool]


LEDGER: tuple[Patch, ...] = (
    Patch(
        name="cpu_platform_backend_choice",
        target="vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls",
        why="The CPU platform returns CPU_ATTN for every selected backend except MLA ones, "
        "so --attention-backend DUO would be ignored with an info line.",
        how="Wraps the classmethod: when the selected backend is DUO it returns DUO's class "
        "path (refusing MLA/sparse layers clearly); anything else goes to the original.",
        remove_when="CpuPlatform honours a registered out-of-tree backend by itself "
        "(still_needed() turns False).",
        apply=cpu_platform.apply,
        still_needed=cpu_platform.still_needed,
    ),
    Patch(
        name="attention_layer_head_caches",
        target="vllm.model_executor.layers.attention.Attention.__init__",
        why="A backend cannot add KV cache layers, and DuoAttention needs one paged cache per "
        "KV head (different lifetimes per head). The impl is built without the layer name, "
        "so only the layer can attach them.",
        how="Wraps __init__: after the original, a layer whose impl is DUO's gets one "
        "DuoHeadCache per local KV head registered in static_forward_context, and is marked "
        "as sharing its first head's KV cache so it allocates nothing itself.",
        remove_when="vLLM lets a backend declare per-layer KV cache specs with several "
        "caches per layer (still_needed() turns False when such a hook appears).",
        apply=attention_layer.apply,
        still_needed=attention_layer.still_needed,
    ),
    Patch(
        name="early_settings_validation",
        target="check_and_update_config of the running platform class (CpuPlatform, CudaPlatform)",
        why="Bad VLLM_DUO_* values or patterns would otherwise surface only inside the spawned "
        "engine core, behind vLLM's generic 'Engine core initialization failed'.",
        how="Wraps the classmethod: after the original, when DUO is selected it builds the "
        "model's head plan (settings, pattern, shape check) in the config-building process.",
        remove_when="Attention backends get a config-time validation hook "
        "(still_needed() turns False).",
        apply=early_validation.apply,
        still_needed=early_validation.still_needed,
    ),
)

_lock = threading.Lock()
_applied = False


def apply_all() -> None:
    """Apply every patch of the ledger, once per process."""
    global _applied
    with _lock:
        if _applied:
            return
        for patch in LEDGER:
            patch.apply()
        _applied = True
