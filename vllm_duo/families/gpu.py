"""The GPU kernel family: one paged-attention call per run, no host sync inside a layer.

Retrieval heads go to the fastest paged kernel that is installed: vLLM's FlashAttention
varlen kernel (CUDA builds of vLLM), else vLLM's Triton unified attention (where vLLM has
Triton), else this project's Triton kernels with no window (``sink=0``, a window longer than
any sequence). Streaming heads: decode rows with the ``csrc/`` CUDA kernel where the
extension is built, else the Triton decode kernel; prefill chunks with the Triton prefill
kernel, which reads a chunk's own keys from the step (their cache blocks may be null).

fp8 KV caches (e4m3 only: the Triton and CUDA sink+window kernels read no e5m2): the step's
keys/values are written as vLLM's CUDA kernels write them (:func:`vllm_duo.kernels.fp8.
quantize_cuda`) and every kernel reads them with the layer's scales; retrieval heads then use
this project's Triton kernel, since vLLM's FlashAttention and Triton unified attention take
fp8 through descale tensors no test here can run (they need a CUDA build of vLLM).

The builder asks vLLM to put decode requests first and prepares every index the kernels
need from host copies vLLM already has, so ``forward_run`` only launches device work. On a
CPU build of vLLM the same code runs with CPU tensors under Triton's interpreter
(``VLLM_DUO_KERNELS=triton`` and ``TRITON_INTERPRET=1``): slow, but it exercises every
layout, write, index and block-table path of the GPU family inside real vLLM.
"""

from __future__ import annotations

import torch

from vllm_duo import cuda_ops
from vllm_duo._vllm import flash_attn_varlen, triton_unified_attention
from vllm_duo.errors import DuoConfigError
from vllm_duo.families.base import GroupStep, KVScales, select_heads, store_heads
from vllm_duo.head_layout import HeadRun, split_pages
from vllm_duo.kernels import triton_sink_window as duo_triton
from vllm_duo.kernels.fp8 import cache_format, dequantize, quantize_cuda
from vllm_duo.settings import ENV_KERNELS

FLASH_ATTN = "vLLM FlashAttention varlen"
TRITON_UNIFIED = "vLLM Triton unified attention"
DUO_TRITON = "vllm-duo Triton (no window)"
CSRC_DECODE = "vllm-duo csrc CUDA decode"
TRITON_DECODE = "vllm-duo Triton decode"


def _flash_attn():
    return flash_attn_varlen()


def _unified_attention():
    return triton_unified_attention()


def pick_kernels(choice: str, device_type: str) -> tuple[str, str]:
    """(retrieval kernel, streaming decode kernel) for ``VLLM_DUO_KERNELS=choice``."""
    if device_type == "cpu":
        if choice != "triton":
            raise DuoConfigError(
                f"{ENV_KERNELS}={choice!r} cannot select the GPU kernel family on CPU: only "
                "'triton' (under TRITON_INTERPRET=1) runs it there."
            )
        if not duo_triton.is_available():
            raise DuoConfigError(f"{ENV_KERNELS}=triton: {duo_triton.load_error()}")
        return DUO_TRITON, TRITON_DECODE
    if choice == "triton":
        retrieval = TRITON_UNIFIED if _unified_attention() is not None else DUO_TRITON
        return retrieval, TRITON_DECODE
    if _flash_attn() is not None:
        retrieval = FLASH_ATTN
    elif _unified_attention() is not None:
        retrieval = TRITON_UNIFIED
    else:
        retrieval = DUO_TRITON
    if cuda_ops.is_available():
        return retrieval, CSRC_DECODE
    if choice == "native":
        raise DuoConfigError(
            f"{ENV_KERNELS}=native needs the csrc/ CUDA decode extension, but "
            f"{cuda_ops.load_error()}. Rebuild with `pip install -e '.[cuda]'` on a machine "
            f"with nvcc, or set {ENV_KERNELS}=auto to use the Triton decode kernel."
        )
    return retrieval, TRITON_DECODE


class GpuKernels:
    """Paged kernels for retrieval heads, sink+window kernels for streaming heads."""

    name = "gpu"

    def __init__(
        self,
        *,
        choice: str,
        device_type: str,
        scale: float,
        sink: int,
        recent: int,
        kv_cache_dtype: str,
    ) -> None:
        self.retrieval_kernel, self.decode_kernel = pick_kernels(choice, device_type)
        self.kv_format = cache_format(kv_cache_dtype)
        if self.kv_format is not None:
            if self.kv_format.name != "e4m3":
                raise DuoConfigError(
                    f"--kv-cache-dtype {kv_cache_dtype} with --attention-backend DUO: the GPU "
                    "kernel family reads fp8 e4m3 caches only; use --kv-cache-dtype fp8 "
                    "(e4m3) or auto."
                )
            self.retrieval_kernel = DUO_TRITON
        if device_type == "cpu" and not duo_triton.is_interpreted():
            raise DuoConfigError(
                f"{ENV_KERNELS}=triton on CPU runs Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before starting vLLM."
            )
        self.scale = scale
        self.sink = sink
        self.recent = recent
        self.kv_cache_dtype = kv_cache_dtype
        self._kv_scales: tuple[float | None, float | None] = (None, None)

    def describe(self) -> str:
        return (
            f"retrieval heads: {self.retrieval_kernel}, one call per layer and cache group; "
            f"streaming heads: {self.decode_kernel} for decode rows and vllm-duo Triton "
            "sink+window prefill for prefill chunks, one call each per layer and cache group"
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
        num_tokens, _, group, head_size = query.shape
        heads = len(run.kv_heads)
        key_pages, value_pages = split_pages(run.cache)
        # [num_blocks, block_size, heads, D]: the order vLLM's CUDA kernels and ours read.
        key_cache, value_cache = key_pages.transpose(1, 2), value_pages.transpose(1, 2)
        new_keys, new_values = select_heads(key, run), select_heads(value, run)
        blocks, offsets = _write_slots(step, key_cache.shape[1], num_tokens)
        fmt, k_scale, v_scale = self.kv_format, scales._k_scale_float, scales._v_scale_float
        if fmt is None:
            key_cache[blocks, offsets] = new_keys.to(key_cache.dtype)
            value_cache[blocks, offsets] = new_values.to(value_cache.dtype)
        else:
            stored_keys = quantize_cuda(new_keys, fmt, k_scale)
            stored_values = quantize_cuda(new_values, fmt, v_scale)
            key_cache[blocks, offsets] = stored_keys
            value_cache[blocks, offsets] = stored_values
            # The prefill kernel reads the step's keys as values: give it what the cache holds.
            new_keys = dequantize(stored_keys, fmt, k_scale, query.dtype)
            new_values = dequantize(stored_values, fmt, v_scale, query.dtype)
        self._kv_scales = (k_scale, v_scale) if fmt is not None else (None, None)

        q = select_heads(query, run).reshape(num_tokens, heads * group, head_size)
        direct = run.head_range is not None
        out = (
            output[:, run.head_range].view(num_tokens, heads * group, head_size)
            if direct
            else torch.empty_like(q)
        )
        if run.retrieval:
            self._retrieval(step, q, key_cache, value_cache, out)
        else:
            self._streaming(run, step, q, key_cache, value_cache, new_keys, new_values, out)
        if not direct:
            store_heads(output, run, out.view(num_tokens, heads, group, head_size))

    def _retrieval(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        if self.retrieval_kernel == FLASH_ATTN:
            flash_attn = _flash_attn()
            assert flash_attn is not None
            varlen, version = flash_attn
            result = varlen(
                q=q.contiguous(), k=key_cache, v=value_cache,
                cu_seqlens_q=step.query_start_loc, max_seqlen_q=step.max_query_len,
                seqused_k=step.seq_lens, max_seqlen_k=step.max_seq_len,
                softmax_scale=self.scale, causal=True, block_table=step.block_table,
                fa_version=version(head_size=q.shape[-1]),
            )  # fmt: skip
            out.copy_(result)
            return
        if self.retrieval_kernel == TRITON_UNIFIED:
            unified = _unified_attention()
            assert unified is not None
            unified(
                q=q, k=key_cache, v=value_cache, out=out,
                cu_seqlens_q=step.query_start_loc, max_seqlen_q=step.max_query_len,
                seqused_k=step.seq_lens, max_seqlen_k=step.max_seq_len,
                softmax_scale=self.scale, causal=True, window_size=(-1, -1),
                block_table=step.block_table, softcap=0, q_descale=None, k_descale=None,
                v_descale=None,
            )  # fmt: skip
            return
        # Full causal attention is the streaming rule with no sink and a window longer
        # than any sequence of the step.
        window = max(step.max_seq_len, 1)
        self._sink_window(step, q, key_cache, value_cache, None, None, out, 0, window)

    def _streaming(
        self,
        run: HeadRun,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        new_keys: torch.Tensor,
        new_values: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        decodes = step.num_decodes
        if decodes and self.decode_kernel == CSRC_DECODE:
            cuda_ops.sink_window_decode_heads(
                q[:decodes], [run.cache[:, h : h + 1] for h in range(len(run.kv_heads))],
                step.block_table[:decodes], step.seq_lens[:decodes], sink=self.sink,
                recent=self.recent, scale=self.scale, out=out[:decodes],
                k_scale=self._kv_scales[0] or 1.0, v_scale=self._kv_scales[1] or 1.0,
            )  # fmt: skip
            self._prefill_rows(step, q, key_cache, value_cache, new_keys, new_values, out)
            return
        self._sink_window(
            step, q, key_cache, value_cache, new_keys, new_values, out, self.sink, self.recent
        )

    def _sink_window(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        new_keys: torch.Tensor | None,
        new_values: torch.Tensor | None,
        out: torch.Tensor,
        sink: int,
        recent: int,
    ) -> None:
        """Triton decode kernel for the decode rows, Triton prefill kernel for the rest."""
        decodes = step.num_decodes
        if decodes:
            duo_triton.sink_window_decode_triton(
                q[:decodes], key_cache, value_cache, step.block_table[:decodes],
                step.seq_lens[:decodes], sink=sink, recent=recent, scale=self.scale,
                out=out[:decodes], k_scale=self._kv_scales[0], v_scale=self._kv_scales[1],
            )  # fmt: skip
        self._prefill_rows(step, q, key_cache, value_cache, new_keys, new_values, out, sink, recent)

    def _prefill_rows(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        new_keys: torch.Tensor | None,
        new_values: torch.Tensor | None,
        out: torch.Tensor,
        sink: int | None = None,
        recent: int | None = None,
    ) -> None:
        decodes, first = step.num_decodes, step.num_decode_tokens
        if decodes == step.num_reqs:
            return
        rows = slice(first, step.num_actual_tokens)
        duo_triton.sink_window_prefill_triton(
            q[rows], key_cache, value_cache, step.block_table[decodes:],
            _prefill_query_start_loc(step), step.seq_lens[decodes:],
            sink=self.sink if sink is None else sink,
            recent=self.recent if recent is None else recent, scale=self.scale,
            new_keys=None if new_keys is None else new_keys[rows],
            new_values=None if new_values is None else new_values[rows], out=out[rows],
            k_scale=self._kv_scales[0], v_scale=self._kv_scales[1],
        )  # fmt: skip


def _write_slots(
    step: GroupStep, block_size: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of every token of the step: once per step and cache group.

    Padding (-1) and chunk tokens that leave a streaming window within the step (mapped to
    vLLM's null block 0) are written to block 0, which no request ever reads; filtering
    them out instead would need the host to learn how many there are.
    """
    memo = step.step_cache
    if "gpu_slots" not in memo:
        slots = step.slot_mapping[:num_tokens].clamp_min(0).long()
        memo["gpu_slots"] = (
            torch.div(slots, block_size, rounding_mode="floor"),
            slots % block_size,
        )
    return memo["gpu_slots"]


def _prefill_query_start_loc(step: GroupStep) -> torch.Tensor:
    """Token offsets of the prefill requests, counted from the first prefill token."""
    memo = step.step_cache
    if "prefill_qsl" not in memo:
        memo["prefill_qsl"] = step.query_start_loc[step.num_decodes :] - step.num_decode_tokens
    return memo["prefill_qsl"]
