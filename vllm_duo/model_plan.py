"""Which KV head of which layer is a retrieval head, for the model vLLM is serving.

Reads the ``VLLM_DUO_*`` settings, resolves and validates the pattern against
the model's shape, and logs one start-up line. The plan is cached per process
because vLLM builds every attention layer of a model from the same config.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vllm_duo._vllm import VllmConfig, init_logger
from vllm_duo.patterns import HeadPlan, check_shape, load_gates, resolve_pattern, select_retrieval
from vllm_duo.settings import DuoSettings
from vllm_duo.tp_slots import tp_overflow

logger = init_logger("vllm." + __name__)

STREAMING_CACHE_BOUNDED = True
"""Streaming heads' caches free tokens outside sink + window (DuoStreamingSpec)."""


@dataclass(frozen=True)
class DuoModelPlan:
    """The head split for one model: settings, pattern source and per-layer heads."""

    settings: DuoSettings
    heads: HeadPlan
    source: str

    def is_retrieval(self, layer: int, kv_head: int) -> bool:
        """Whether global KV head ``kv_head`` of decoder layer ``layer`` keeps full context."""
        return kv_head in self.heads.retrieval[layer]

    def log_line(self, max_model_len: int, bounded_streaming_cache: bool) -> str:
        """The start-up summary: source, selection, heads, S, W and KV bytes."""
        s = self.settings
        read = self.heads.kv_bytes_ratio(max_model_len, s.sink, s.recent)
        stored = read if bounded_streaming_cache else 1.0
        selection = (
            f"threshold={s.threshold:g}" if s.threshold is not None else f"sparsity={s.sparsity:g}"
        )
        return (
            f"DuoAttention: pattern {self.source}, {selection}, {self.heads.summary()}; "
            f"sink S={s.sink}, recent W={s.recent}; at {max_model_len} tokens KV bytes per "
            f"token read by decode = {read:.3f}x and stored = {stored:.3f}x of full attention"
        )


_lock = threading.Lock()
_plans: dict[tuple, DuoModelPlan] = {}


def model_identity(vllm_config: VllmConfig) -> tuple[str, int, int]:
    """(model id or path, decoder layers, KV heads) of the served model."""
    model_config = vllm_config.model_config
    hf_text = model_config.hf_text_config
    num_layers = int(hf_text.num_hidden_layers)
    num_kv_heads = int(model_config.get_total_num_kv_heads())
    return str(model_config.model), num_layers, num_kv_heads


def plan_for(vllm_config: VllmConfig, settings: DuoSettings | None = None) -> DuoModelPlan:
    """The process-wide plan for ``vllm_config``'s model (built and logged once)."""
    settings = DuoSettings.from_env() if settings is None else settings
    model_id, num_layers, num_kv_heads = model_identity(vllm_config)
    key = (settings, model_id, num_layers, num_kv_heads)
    with _lock:
        plan = _plans.get(key)
        if plan is None:
            plan = _build(settings, model_id, num_layers, num_kv_heads)
            _plans[key] = plan
            logger.info(
                plan.log_line(vllm_config.model_config.max_model_len, STREAMING_CACHE_BOUNDED)
            )
            world = vllm_config.parallel_config.tensor_parallel_size
            if world > 1:
                num_local = max(num_kv_heads // world, 1)
                overflow, extra = tp_overflow(
                    plan.heads, num_local, world, vllm_config.model_config.max_model_len,
                    settings.sink, settings.recent,
                )  # fmt: skip
                logger.info(
                    "DuoAttention: tensor_parallel_size=%d stores %d of its %d head caches per "
                    "rank with full context (streaming heads in full slots) so all ranks declare "
                    "equal KV specs: "
                    "+%.1f%% KV bytes",
                    world, overflow, num_layers * num_local, 100.0 * extra,
                )  # fmt: skip
    return plan


def _build(
    settings: DuoSettings, model_id: str, num_layers: int, num_kv_heads: int
) -> DuoModelPlan:
    path, source = resolve_pattern(settings.pattern, model_id, (num_layers, num_kv_heads))
    gates = load_gates(path)
    check_shape(gates, num_layers, num_kv_heads, source)
    mask = select_retrieval(gates, **settings.selection_kwargs())
    heads = HeadPlan.from_mask(mask)
    return DuoModelPlan(settings=settings, heads=heads, source=source)
