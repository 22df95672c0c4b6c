"""Run one vLLM engine in a fresh process and dump what the tests compare.

Usage: python engine_runner.py REQUEST.json RESULT.json

Every engine runs in its own process because ``VLLM_DUO_*`` settings are read
once per process and vLLM's in-process engine keeps global state.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(request_path: str, result_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    os.environ.update(request.get("env", {}))

    from vllm import LLM, SamplingParams

    count = request.get("count_kernel_calls")
    counter = (_GpuKernelCounter() if count == "gpu" else _KernelCounter()) if count else None
    capture = _AttentionCapture() if request.get("capture_attention") else None
    started = time.perf_counter()
    llm = LLM(model=request["model"], **request["llm_kwargs"])
    startup_s = time.perf_counter() - started
    if request.get("kv_scales"):
        _set_kv_scales(llm, request["kv_scales"]["k"], request["kv_scales"]["v"])
    probe = _Probe(llm) if request.get("probe") else None
    params = SamplingParams(
        max_tokens=request["max_tokens"],
        temperature=0.0,
        # Prompt logprobs bypass the prefix cache, so prefix tests turn them off.
        prompt_logprobs=0 if request.get("prompt_logprobs", True) else None,
        logprobs=0,
        detokenize=False,
        ignore_eos=True,
    )
    all_prompts = request["prompts"]
    # "batches": lists of prompt indices, each one llm.generate call, in order; results
    # come back in prompt order. "sequential" is one batch per prompt.
    order = request.get("batches") or (
        [[i] for i in range(len(all_prompts))]
        if request.get("sequential")
        else [list(range(len(all_prompts)))]
    )
    results: list[dict | None] = [None] * len(all_prompts)
    if capture is not None:
        capture.active = True  # not the start-up's dummy runs
    for batch in order:
        prompts = [{"prompt_token_ids": all_prompts[i]} for i in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for index, out in zip(batch, outputs):
            ids = all_prompts[index]
            completion = out.outputs[0]
            results[index] = {
                "prompt_logprobs": [
                    out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))
                ]
                if out.prompt_logprobs
                else [],
                "tokens": list(completion.token_ids),
                "logprobs": [
                    step[token].logprob
                    for step, token in zip(completion.logprobs, completion.token_ids)
                ],
                "num_cached_tokens": out.num_cached_tokens,
            }
    assert all(r is not None for r in results), "a prompt is in no batch"
    report = {"startup_s": startup_s, "outputs": results}
    if probe is not None:
        report.update(probe.report())
    if request.get("max_concurrency"):
        report["max_concurrency"] = {
            str(n): _max_concurrency(llm, n) for n in request["max_concurrency"]
        }
    if counter is not None:
        report["kernel_calls"] = counter.forwards
    if capture is not None:
        import torch

        torch.save(capture.calls, result_path + ".attention.pt")
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(report, f)


def _max_concurrency(llm, tokens: int) -> float:
    """vLLM's 'Maximum concurrency' figure for requests of ``tokens`` tokens.

    The function vLLM logs it with, on this engine's KV cache config with max_model_len
    replaced (the pool does not depend on it), so one engine answers for several lengths.
    """
    import copy

    from vllm_duo._vllm import get_max_concurrency_for_kv_cache_config

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    config = copy.copy(engine.vllm_config)
    model_config = copy.copy(config.model_config)
    model_config.max_model_len = tokens
    object.__setattr__(config, "model_config", model_config)
    return float(get_max_concurrency_for_kv_cache_config(config, scheduler.kv_cache_config))


def _set_kv_scales(llm, k_scales: list[float], v_scales: list[float]) -> None:
    """Per-layer fp8 KV scales, set as vLLM sets scales it loads from a checkpoint.

    (``BaseKVCacheMethod.process_weights_after_loading``: the tensors and their host
    copies, which every CPU attention call reads.) In-process engine only.
    """

    def apply(model) -> int:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        count = 0
        for module in model.modules():
            if isinstance(module, Attention):
                layer = extract_layer_index(module.layer_name)
                k, v = float(k_scales[layer]), float(v_scales[layer])
                module._k_scale.fill_(k)
                module._v_scale.fill_(v)
                module._k_scale_float, module._v_scale_float = k, v
                count += 1
        return count

    assert all(llm.apply_model(apply)), "no attention layer got its KV scales"


class _AttentionCapture:
    """Records every DUO layer forward while active (in-process engine): the layer, the
    step's query/key/value as vLLM computed them, the output DUO wrote, the step's query
    offsets and sequence lengths, and the layer's KV scales."""

    def __init__(self) -> None:
        from vllm_duo import backend

        self.active = False
        self.calls: list[dict] = []
        forward = backend.DuoAttentionImpl.forward
        capture = self

        def recorded(impl, layer, query, key, value, kv_cache, attn_metadata, output, *a, **k):
            result = forward(impl, layer, query, key, value, kv_cache, attn_metadata, output,
                             *a, **k)  # fmt: skip
            if capture.active and attn_metadata is not None:
                n = attn_metadata.num_actual_tokens
                capture.calls.append({
                    "layer": layer.layer_name,
                    "query_start_loc": list(attn_metadata.query_start_loc_host),
                    "seq_lens": attn_metadata.seq_lens[: attn_metadata.num_reqs].tolist(),
                    "query": query[:n].detach().clone(),
                    "key": key[:n].detach().clone(),
                    "value": value[:n].detach().clone(),
                    "output": output[:n].detach().clone(),
                    "k_scale": layer._k_scale_float,
                    "v_scale": layer._v_scale_float,
                    "scale": impl.scale,
                })  # fmt: skip
            return result

        backend.DuoAttentionImpl.forward = recorded


class _KernelCounter:
    """Counts, per DUO layer forward, the kernel calls of the CPU family (in-process engine).

    Each forward records the layer's retrieval and streaming head counts and how many
    times each kernel ran: vLLM's CPU attention or the native paged attention op, and
    vLLM's cache write for retrieval heads; the sink+window attention (native op or torch
    path) and the native cache write for streaming heads.
    """

    KERNELS = {
        "cpu_attention_with_kv_cache": "retrieval_attention",
        "paged_attention": "retrieval_attention",
        "cpu_attn_reshape_and_cache": "retrieval_write",
        "sink_window_attention": "streaming_attention",
        "store_kv": "streaming_write",
    }

    def __init__(self) -> None:
        from vllm_duo import backend
        from vllm_duo.families import cpu

        self.forwards: list[dict] = []
        self._current: dict | None = None
        counter = self

        class CountingOps:
            def __init__(self, real) -> None:
                self._real = real

            def __getattr__(self, name):
                fn = getattr(self._real, name)
                if name not in counter.KERNELS:
                    return fn

                def counted(*args, **kwargs):
                    counter._count(counter.KERNELS[name])
                    counter._count(name)
                    return fn(*args, **kwargs)

                return counted

        cpu.ops = CountingOps(cpu.ops)
        cpu.cpu_ops = CountingOps(cpu.cpu_ops)
        streaming = cpu.sink_window_attention_heads

        def counted_streaming(*args, **kwargs):
            counter._count("streaming_attention")
            return streaming(*args, **kwargs)

        cpu.sink_window_attention_heads = counted_streaming
        forward = backend.DuoAttentionImpl.forward

        def counted_forward(impl, layer, query, key, value, kv_cache, attn_metadata, *a, **k):
            if attn_metadata is None:
                return forward(impl, layer, query, key, value, kv_cache, attn_metadata, *a, **k)
            counter._current = {
                "retrieval_heads": sum(h.retrieval for h in impl.head_caches),
                "streaming_heads": sum(not h.retrieval for h in impl.head_caches),
                "native": getattr(impl.kernels, "native", False),
                "native_retrieval": getattr(impl.kernels, "native_retrieval", False),
                "isa": attn_metadata.isa,
            }
            try:
                return forward(impl, layer, query, key, value, kv_cache, attn_metadata, *a, **k)
            finally:
                self.forwards.append(counter._current)
                counter._current = None

        backend.DuoAttentionImpl.forward = counted_forward

    def _count(self, name: str) -> None:
        if self._current is not None:
            self._current[name] = self._current.get(name, 0) + 1


class _GpuKernelCounter:
    """Counts, per DUO layer forward and head run, the GPU family's writes and launches.

    Each forward records one entry per run of the layer: its kind, head count and how
    many cache writes and attention launches (by kernel) it made.
    """

    COUNTED = {
        "sink_window_decode_triton": "decode",
        "sink_window_prefill_triton": "prefill",
        "sink_window_decode_heads": "decode",
    }

    def __init__(self) -> None:
        from vllm_duo import backend
        from vllm_duo.families import gpu

        self.forwards: list[list[dict]] = []
        self._run: dict | None = None
        counter = self

        class CountingModule:
            def __init__(self, real) -> None:
                self._real = real

            def __getattr__(self, name):
                fn = getattr(self._real, name)
                if name not in counter.COUNTED:
                    return fn

                def counted(*args, **kwargs):
                    counter._count(counter.COUNTED[name])
                    return fn(*args, **kwargs)

                return counted

        gpu.duo_triton = CountingModule(gpu.duo_triton)
        gpu.cuda_ops = CountingModule(gpu.cuda_ops)
        write = gpu.write_run

        def counted_write(*args, **kwargs):
            counter._count("write")
            return write(*args, **kwargs)

        gpu.write_run = counted_write
        forward_run = gpu.GpuKernels.forward_run

        def counted_forward_run(kernels, run, *args, **kwargs):
            self._run = {"retrieval": run.retrieval, "heads": len(run.kv_heads)}
            try:
                return forward_run(kernels, run, *args, **kwargs)
            finally:
                self.forwards[-1].append(self._run)
                self._run = None

        gpu.GpuKernels.forward_run = counted_forward_run
        forward = backend.DuoAttentionImpl.forward

        def counted_forward(impl, layer, query, key, value, kv_cache, attn_metadata, *a, **k):
            if attn_metadata is not None:
                self.forwards.append([])
            return forward(impl, layer, query, key, value, kv_cache, attn_metadata, *a, **k)

        backend.DuoAttentionImpl.forward = counted_forward

    def _count(self, name: str) -> None:
        if self._run is not None:
            self._run[name] = self._run.get(name, 0) + 1


class _Probe:
    """Watches the in-process scheduler: live blocks per request and preemptions."""

    def __init__(self, llm) -> None:
        from vllm_duo.streaming_cache import DuoStreamingSpec

        self.scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        managers = self.scheduler.kv_cache_manager.coordinator.single_type_managers
        self.streaming = [m for m in managers if isinstance(m.kv_cache_spec, DuoStreamingSpec)]
        self.full = [m for m in managers if not isinstance(m.kv_cache_spec, DuoStreamingSpec)]
        self.max_streaming_decode = 0
        self.streaming_decode_series: list[int] = []
        self.max_streaming_any = 0
        self.max_full = 0
        self.preemptions = 0
        self.max_running = 0
        self.block_size = managers[0].block_size if managers else 0
        schedule = self.scheduler.schedule
        preempt = self.scheduler._preempt_request

        def watched_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self._look()
            return out

        def counted_preempt(*args, **kwargs):
            self.preemptions += 1
            return preempt(*args, **kwargs)

        self.scheduler.schedule = watched_schedule
        self.scheduler._preempt_request = counted_preempt

    def _look(self) -> None:
        self.max_running = max(self.max_running, len(self.scheduler.running))
        step_max = -1
        for manager in self.streaming + self.full:
            for req_id, blocks in manager.req_to_blocks.items():
                live = sum(not b.is_null for b in blocks)
                request = self.scheduler.requests.get(req_id)
                if manager in self.full:
                    self.max_full = max(self.max_full, live)
                    continue
                self.max_streaming_any = max(self.max_streaming_any, live)
                if request is not None and request.num_computed_tokens >= request.num_prompt_tokens:
                    self.max_streaming_decode = max(self.max_streaming_decode, live)
                    step_max = max(step_max, live)
        if step_max >= 0:
            self.streaming_decode_series.append(step_max)

    def report(self) -> dict:
        return {
            "num_streaming_groups": len(self.streaming),
            "num_full_groups": len(self.full),
            "max_streaming_blocks_decode": self.max_streaming_decode,
            "streaming_decode_series": self.streaming_decode_series,
            "max_streaming_blocks": self.max_streaming_any,
            "max_full_blocks": self.max_full,
            "preemptions": self.preemptions,
            "max_running": self.max_running,
            "block_size": self.block_size,
        }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
