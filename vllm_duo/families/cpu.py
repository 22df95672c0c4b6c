"""The CPU kernel family: vLLM's CPU paged-attention kernel and the native sink+window op.

Retrieval heads: one ``cpu_attn_reshape_and_cache`` per run, over the run's strided cache
view, then one attention call over the same view: the C++ extension's ``paged_attention``
(decode and prefill rows in one call; the query heads of a KV head share every key/value
load; a decode's long context is split across cores) where vLLM's pages have the plain
``vec``/``vec16`` layout and the cache is in the model's dtype, else vLLM's
``cpu_attention_with_kv_cache`` (it honours the strides of its cache and query arguments),
with scheduler metadata sized for the run's head count.
Streaming heads: one ``store_kv`` and one ``sink_window_attention`` call of the C++
extension (:mod:`vllm_duo.cpu_ops`) per run, reading and writing the layer's query, keys and
output in place. Where the extension is not built, the pure-torch path
(:func:`vllm_duo.kernels.sink_window_torch.sink_window_attention_heads`) serves instead, on
a slot plan made once per step and cache group.

fp8 KV caches (``--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2``): retrieval heads go through vLLM's
own fp8 support (its write and kernel take the dtype and the layer's scales); streaming heads
write the same bytes vLLM would (:func:`vllm_duo.kernels.fp8.quantize_cpu`, in C++ or torch)
and read them back with the same scales.
"""

from __future__ import annotations

import torch

from vllm_duo import cpu_ops
from vllm_duo._vllm import cpu_attn_isa, envs, ops
from vllm_duo.errors import DuoConfigError
from vllm_duo.families.base import GroupStep, KVScales, select_heads, store_heads
from vllm_duo.head_layout import HeadRun
from vllm_duo.kernels.fp8 import cache_format, quantize_cpu
from vllm_duo.kernels.sink_window_torch import (
    StreamingPlan,
    plan_streaming,
    sink_window_attention_heads,
)
from vllm_duo.settings import ENV_KERNELS

# vLLM CPU kernels whose pages hold keys transposed ([D][block_size]) and then value rows, the
# layout vllm_duo_cpu.paged_attention reads (tests/test_cpu_paged_attention.py checks it against
# vLLM's own cache write).
_PAGE_LAYOUT_ISAS = ("vec", "vec16")


def _check_cpu_fp8(kv_cache_dtype: str, dtype: torch.dtype, head_size: int) -> None:
    """Refuses an fp8 cache where vLLM's CPU attention (the retrieval heads' kernel) does.

    vLLM decides when it picks its kernel's instruction set (x86 with AVX-512 or AMX, head
    sizes divisible by 32); asking that same function keeps DUO's answer equal to the stock
    backend's, at start-up instead of when the first cache group is built.
    """
    try:
        # The block size only picks among instruction sets; any multiple of 32 asks the
        # same fp8 questions.
        cpu_attn_isa(dtype, 32, head_size, kv_cache_dtype)
    except NotImplementedError as exc:
        raise DuoConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} with --attention-backend DUO "
            f"(head_size={head_size}): vLLM's CPU attention refuses it: {exc} "
            "Use --kv-cache-dtype auto on this machine or model."
        ) from exc


class CpuKernels:
    """vLLM's CPU kernel for retrieval heads, torch sink+window for streaming heads."""

    name = "cpu"

    def __init__(
        self,
        *,
        scale: float,
        sink: int,
        recent: int,
        kv_cache_dtype: str,
        dtype: torch.dtype,
        head_size: int,
        require_native: bool = False,
        stock_retrieval_kernel: bool = False,
    ) -> None:
        self.kv_format = cache_format(kv_cache_dtype)
        if self.kv_format is not None:
            _check_cpu_fp8(kv_cache_dtype, dtype, head_size)
        self.native = cpu_ops.is_available()
        # Without streaming heads (sparsity 0) DUO must give the stock backend's outputs
        # (DESIGN.md section 3): the same kernel gives them bit for bit. fp8 pages hold bytes
        # the C++ op does not read.
        self.native_retrieval = (
            self.native and not stock_retrieval_kernel and self.kv_format is None
        )
        if require_native and not self.native:
            raise DuoConfigError(
                f"{ENV_KERNELS}=native needs the CPU extension, but {cpu_ops.load_error()}; "
                f"or set {ENV_KERNELS}=auto to use the pure-torch sink+window path."
            )
        self.scale = scale
        self.sink = sink
        self.recent = recent
        self.kv_cache_dtype = kv_cache_dtype
        self.dtype = dtype

    def describe(self) -> str:
        streaming = (
            "the vllm-duo C++ sink+window op"
            if self.native
            else f"torch sink+window attention (the C++ op is unavailable: {cpu_ops.load_error()})"
        )
        retrieval = (
            "the vllm-duo C++ paged attention op (vLLM's CPU kernel on AMX pages)"
            if self.native_retrieval
            else "vLLM's CPU paged-attention kernel"
        )
        return (
            f"retrieval heads: {retrieval}, one call per layer and cache group; streaming "
            f"heads: {streaming}, one call per layer and cache group"
        )

    def forward_run(
        self,
        run: HeadRun,
        step: GroupStep,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        scales: KVScales,
    ) -> None:
        if run.retrieval:
            self._retrieval(run, step, query, key, value, output, scales)
        else:
            self._streaming(run, step, query, key, value, output, scales)

    def _scheduler(
        self, step: GroupStep, num_kv_heads: int, group: int, head_size: int
    ) -> torch.Tensor:
        """vLLM's CPU work split for ``num_kv_heads`` heads: once per step and head count."""
        memo = step.step_cache.setdefault("cpu_scheduler", {})
        if num_kv_heads not in memo:
            memo[num_kv_heads] = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=step.num_reqs,
                num_heads=num_kv_heads * group,
                num_kv_heads=num_kv_heads,
                head_dim=head_size,
                seq_lens=step.seq_lens,
                dtype=self.dtype,
                query_start_loc=step.query_start_loc,
                causal=True,
                sliding_window_size=-1,
                isa=step.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                kv_cache_dtype=self.kv_cache_dtype,
            )
        return memo[num_kv_heads]

    def _retrieval(
        self,
        run: HeadRun,
        step: GroupStep,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        scales: KVScales,
    ) -> None:
        num_tokens, _, group, head_size = query.shape
        heads = len(run.kv_heads)
        key_cache, value_cache = run.key_pages, run.value_pages
        ops.cpu_attn_reshape_and_cache(
            select_heads(key, run), select_heads(value, run), key_cache, value_cache,
            step.slot_mapping[:num_tokens], step.isa,
            k_scale=scales._k_scale_float, v_scale=scales._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )  # fmt: skip
        if self._native_attention(step):
            cpu_ops.paged_attention(query, run.cache, run.index, step.block_table,
                                    step.query_start_loc, step.seq_lens, scale=self.scale,
                                    out=output)  # fmt: skip
            return
        q = select_heads(query, run).reshape(num_tokens, heads * group, head_size)
        scheduler = self._scheduler(step, heads, group, head_size)
        # The kernel honours strides on its inputs but not on `output`.
        out = torch.empty(num_tokens, heads * group, head_size, dtype=query.dtype)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=step.query_start_loc, seq_lens=step.seq_lens, scale=self.scale,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=step.block_table,
            softcap=0, scheduler_metadata=scheduler, s_aux=None,
            k_scale=scales._k_scale_float, v_scale=scales._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )  # fmt: skip
        store_heads(output, run, out.view(num_tokens, heads, group, head_size))

    def _native_attention(self, step: GroupStep) -> bool:
        """Whether the C++ attention op serves this step's retrieval heads.

        Caches in the model's dtype in vLLM's page layout of its ``vec``/``vec16`` kernels
        (transposed keys, then value rows); AMX pages are packed differently and fp8 pages
        hold bytes, and both stay with vLLM's kernel, as does a model without streaming
        heads.
        """
        return self.native_retrieval and step.isa in _PAGE_LAYOUT_ISAS

    def _streaming(
        self,
        run: HeadRun,
        step: GroupStep,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        scales: KVScales,
    ) -> None:
        num_tokens = query.shape[0]
        block_size = run.cache.shape[2]
        k_scale, v_scale = scales._k_scale_float, scales._v_scale_float
        # [num_blocks, block_size, heads, D]: one write and one gather cover all heads.
        key_cache, value_cache = run.keys, run.values
        if self.native:
            # Block 0 is vLLM's null block: chunk tokens that leave the window within
            # this step are mapped there and are not stored.
            fp8 = {"kv_cache_dtype": self.kv_cache_dtype, "k_scale": k_scale, "v_scale": v_scale}
            cpu_ops.store_kv(key, value, run.index, step.slot_mapping, key_cache, value_cache,
                             min_slot=block_size, **fp8)  # fmt: skip
            cpu_ops.sink_window_attention(
                query, key_cache, value_cache, run.index, step.block_table,
                step.query_start_loc, step.seq_lens, key, value, sink=self.sink,
                recent=self.recent, scale=self.scale, out=output, **fp8,
            )  # fmt: skip
            return
        stored, blocks, offsets, plan = self._step_plan(step, block_size, num_tokens)
        new_keys, new_values = select_heads(key, run), select_heads(value, run)
        if self.kv_format is None:
            key_cache[blocks, offsets] = new_keys[stored].to(key_cache.dtype)
            value_cache[blocks, offsets] = new_values[stored].to(value_cache.dtype)
        else:
            key_cache[blocks, offsets] = quantize_cpu(new_keys[stored], self.kv_format, k_scale)
            value_cache[blocks, offsets] = quantize_cpu(new_values[stored], self.kv_format,
                                                        v_scale)  # fmt: skip
        out = sink_window_attention_heads(
            select_heads(query, run), key_cache, value_cache, plan, scale=self.scale,
            new_keys=new_keys, new_values=new_values, kv_format=self.kv_format,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
        store_heads(output, run, out)

    def _step_plan(
        self, step: GroupStep, block_size: int, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StreamingPlan]:
        """Where this step's K/V go and which slots queries read: once per group and step."""
        memo = step.step_cache
        if "plan" not in memo:
            assert step.seq_lens_host is not None, "the CPU family needs host sequence lengths"
            slots = step.slot_mapping[:num_tokens]
            # Block 0 is vLLM's null block: chunk tokens that leave the window within
            # this step are mapped there and must not be stored.
            stored = slots >= block_size
            memo["stored"] = stored
            memo["blocks"] = torch.div(slots[stored], block_size, rounding_mode="floor")
            memo["offsets"] = slots[stored] % block_size
            memo["plan"] = plan_streaming(
                step.block_table, step.query_start_loc_host, step.seq_lens_host,
                sink=self.sink, recent=self.recent, block_size=block_size, keys_from_step=True,
            )  # fmt: skip
        return memo["stored"], memo["blocks"], memo["offsets"], memo["plan"]
