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
from vllm_duo.errors import DuoConfigError
from vllm_duo.families.base import GroupStep, KVScales, select_heads, store_heads
from vllm_duo.head_layout import HeadRun
from vllm_duo.kernels import triton_sink_window as duo_triton
from vllm_duo.kernels.fp8 import cache_format, dequantize, quantize_cuda
from vllm_duo.settings import ENV_KERNELS

FLASH_ATTN = "vLLM FlashAttention varlen"
TRITON_UNIFIED = "vLLM Triton unified attention"
DUO_TRITON = "vllm-duo Triton (no window)"
CSRC_DECODE = "vllm-duo csrc CUDA decode"
TRITON_DECODE = "vllm-duo Triton decode"


def _flash_attn():
    """vLLM's FlashAttention varlen function and version, or None where it is not built."""
    if not torch.cuda.is_available():
        return None
    try:  # late: this module imports without vLLM (the GPU check machine has none)
        from vllm_duo._vllm import flash_attn_varlen
    except ImportError:
        return None
    return flash_attn_varlen()


def _unified_attention():
    """vLLM's Triton unified attention, or None where vLLM runs without Triton."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm_duo._vllm import triton_unified_attention
    except ImportError:
        return None
    return triton_unified_attention()


# What the csrc/ decode extension serves (csrc/README.md, "Layout"); anything else goes to
# the Triton decode kernel, which takes any head size up to 256 and any block size.
CSRC_DTYPES = (torch.float16, torch.bfloat16)
CSRC_HEAD_SIZES = (64, 128, 256)
CSRC_BLOCK_SIZES = (16, 32, 64, 128)
# vLLM's FlashAttention takes fp16/bf16 only, head sizes that are multiples of 8 up to 256.
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _flash_serves(dtype: torch.dtype, head_size: int) -> bool:
    return dtype in FLASH_DTYPES and head_size % 8 == 0 and head_size <= 256


def _csrc_serves(dtype: torch.dtype, head_size: int, block_size: int | None) -> bool:
    return (
        dtype in CSRC_DTYPES
        and head_size in CSRC_HEAD_SIZES
        and (block_size is None or block_size in CSRC_BLOCK_SIZES)
    )


def pick_kernels(
    choice: str,
    device_type: str,
    *,
    dtype: torch.dtype,
    head_size: int,
    block_size: int | None = None,
) -> tuple[str, str]:
    """(retrieval kernel, streaming decode kernel) for ``VLLM_DUO_KERNELS=choice``.

    The fastest installed kernel that serves the model's dtype, head size and block size
    (None: not known yet): FlashAttention needs fp16/bf16, the csrc decode kernel fp16/bf16,
    head sizes 64/128/256 and blocks of 16..128 tokens.
    """
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
    if _flash_serves(dtype, head_size) and _flash_attn() is not None:
        retrieval = FLASH_ATTN
    elif _unified_attention() is not None:
        retrieval = TRITON_UNIFIED
    else:
        retrieval = DUO_TRITON
    if cuda_ops.is_available() and _csrc_serves(dtype, head_size, block_size):
        return retrieval, CSRC_DECODE
    if choice == "native":
        if not cuda_ops.is_available():
            reason = str(cuda_ops.load_error())
        else:
            reason = (
                f"it serves dtype float16/bfloat16, head sizes {CSRC_HEAD_SIZES} and block "
                f"sizes {CSRC_BLOCK_SIZES}; this model has dtype "
                f"{str(dtype).removeprefix('torch.')}, head size {head_size} and block size "
                f"{block_size}"
            )
        raise DuoConfigError(
            f"{ENV_KERNELS}=native needs the csrc/ CUDA decode extension, but {reason}. "
            f"Rebuild with `pip install -e '.[cuda]'` on a machine with nvcc if it is missing, "
            f"or set {ENV_KERNELS}=auto to use the Triton decode kernel."
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
        dtype: torch.dtype,
        head_size: int,
        block_size: int | None = None,
    ) -> None:
        self.retrieval_kernel, self.decode_kernel = pick_kernels(
            choice, device_type, dtype=dtype, head_size=head_size, block_size=block_size
        )
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
        # [num_blocks, block_size, heads, D]: the order vLLM's CUDA kernels and ours read.
        key_cache, value_cache = run.keys, run.values
        new_keys, new_values = select_heads(key, run), select_heads(value, run)
        fmt, k_scale, v_scale = self.kv_format, scales._k_scale_float, scales._v_scale_float
        if fmt is None:
            write_run(step, key_cache, value_cache, new_keys, new_values)
        else:
            stored_keys = quantize_cuda(new_keys, fmt, k_scale)
            stored_values = quantize_cuda(new_values, fmt, v_scale)
            write_run(step, key_cache, value_cache, stored_keys, stored_values)
            # The prefill kernel reads the step's keys as values: give it what the cache holds.
            new_keys = dequantize(stored_keys, fmt, k_scale, query.dtype)
            new_values = dequantize(stored_values, fmt, v_scale, query.dtype)
        # The kernels' fp8 scales: None reads a cache in the model's dtype.
        kv_scales = (k_scale, v_scale) if fmt is not None else (None, None)

        q = select_heads(query, run).reshape(num_tokens, heads * group, head_size)
        direct = run.head_range is not None
        out = (
            output[:, run.head_range].view(num_tokens, heads * group, head_size)
            if direct
            else torch.empty_like(q)
        )
        if run.retrieval:
            self._retrieval(step, q, key_cache, value_cache, out, kv_scales)
        else:
            self._streaming(
                run, step, q, key_cache, value_cache, new_keys, new_values, out, kv_scales
            )
        if not direct:
            store_heads(output, run, out.view(num_tokens, heads, group, head_size))

    def _retrieval(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        out: torch.Tensor,
        kv_scales: tuple[float | None, float | None],
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
        if self.retrieval_kernel == TRITON_UNIFIED and _int32_head_offsets(key_cache):
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
        # Full causal attention is the streaming rule with no sink and a window as long as
        # the block table can address. Taken from shapes, not from the step's longest
        # sequence: a host value of the step would be frozen into a captured CUDA graph.
        window = step.block_table.shape[1] * key_cache.shape[1]
        self._sink_window(step, q, key_cache, value_cache, None, None, out, kv_scales, 0, window)

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
        kv_scales: tuple[float | None, float | None],
    ) -> None:
        decodes = step.num_decodes
        # The extension takes blocks of 16..128 tokens; other block sizes use Triton's decode
        # (chosen up front when the block size was known at start-up).
        if decodes and self.decode_kernel == CSRC_DECODE and key_cache.shape[1] in CSRC_BLOCK_SIZES:
            cuda_ops.sink_window_decode_heads(
                q[:decodes], [run.cache[:, h : h + 1] for h in range(len(run.kv_heads))],
                step.block_table[:decodes], step.seq_lens[:decodes], sink=self.sink,
                recent=self.recent, scale=self.scale, out=out[:decodes],
                k_scale=kv_scales[0] or 1.0, v_scale=kv_scales[1] or 1.0,
            )  # fmt: skip
            self._prefill_rows(
                step, q, key_cache, value_cache, new_keys, new_values, out, kv_scales
            )
            return
        self._sink_window(step, q, key_cache, value_cache, new_keys, new_values, out, kv_scales,
                          self.sink, self.recent)  # fmt: skip

    def _sink_window(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        new_keys: torch.Tensor | None,
        new_values: torch.Tensor | None,
        out: torch.Tensor,
        kv_scales: tuple[float | None, float | None],
        sink: int,
        recent: int,
    ) -> None:
        """Triton decode kernel for the decode rows, Triton prefill kernel for the rest."""
        decodes = step.num_decodes
        if decodes:
            duo_triton.sink_window_decode_triton(
                q[:decodes], key_cache, value_cache, step.block_table[:decodes],
                step.seq_lens[:decodes], sink=sink, recent=recent, scale=self.scale,
                out=out[:decodes], k_scale=kv_scales[0], v_scale=kv_scales[1],
            )  # fmt: skip
        self._prefill_rows(step, q, key_cache, value_cache, new_keys, new_values, out, kv_scales,
                           sink, recent)  # fmt: skip

    def _prefill_rows(
        self,
        step: GroupStep,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        new_keys: torch.Tensor | None,
        new_values: torch.Tensor | None,
        out: torch.Tensor,
        kv_scales: tuple[float | None, float | None],
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
            k_scale=kv_scales[0], v_scale=kv_scales[1],
        )  # fmt: skip


def _int32_head_offsets(cache: torch.Tensor) -> bool:
    """Whether a [blocks, block_size, heads, D] view's offsets within a block fit int32.

    vLLM's Triton unified attention widens only the block offset to int64; ``kv_head *
    stride`` is int32 there. A run's head stride is a whole cache layer, which on a large
    GPU cache can pass 2**31 elements after a few heads: such runs take the project's
    Triton kernel (int64 offsets) instead.
    """
    _, block_size, heads, head_size = cache.shape
    last = (
        (block_size - 1) * cache.stride(1)
        + (heads - 1) * cache.stride(2)
        + (head_size - 1) * cache.stride(3)
    )
    return last < 2**31


def write_run(
    step: GroupStep,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
) -> None:
    """The step's keys/values of a run's heads into its caches: one indexed store each.

    Args:
        key_cache, value_cache: [num_blocks, block_size, heads, D] views of the run's pages.
        new_keys, new_values: [num_tokens, heads, D] in the order of the views' head axis.
    """
    blocks, offsets = _write_slots(step, key_cache.shape[1], new_keys.shape[0])
    key_cache[blocks, offsets] = new_keys.to(key_cache.dtype)
    value_cache[blocks, offsets] = new_values.to(value_cache.dtype)


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
