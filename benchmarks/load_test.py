"""Load test of ``vllm serve --attention-backend DUO``: concurrency, preemption, prefix caching,
aborted streams, and every completed answer checked against the same request run alone offline.

    .venv/bin/python benchmarks/load_test.py [--requests 80] [--concurrency 64] [--model DIR]
        [--kv-cache-memory-bytes 2500000] [--max-num-batched-tokens 256] [--sink 4] [--recent 16]
        [--seed 0] [--json out.json] [--server-args "MORE VLLM SERVE FLAGS"]
        [--url http://127.0.0.1:8000 --served-model-name NAME]   # use a running server

Loopback only and bounded: at most ``--requests`` requests, ``--concurrency`` in flight, every
request under ``--request-timeout`` seconds and the whole load under ``--load-timeout``.

1. Starts ``vllm serve MODEL --attention-backend DUO`` on 127.0.0.1 with prefix caching on, a
   KV cache small enough that the scheduler has to preempt and a token budget per step small
   enough that long prompts are prefilled in several chunks (default model: the tiny fp32
   Llama of the test suite, S=4, W=16, max_model_len 1024, so prompts run from well inside to
   far beyond S + W).
2. Sends a deterministic mix: /v1/completions and /v1/chat/completions, streaming and not, short,
   medium and long prompts, groups of prompts sharing a long prefix, and streaming clients that
   hang up after a few chunks.
3. Runs every completed request again, alone, in an offline vLLM engine (same model, dtype and
   DUO settings, greedy, prefix caching off, roomy KV cache) and compares token ids.
4. Checks that the server is still healthy, that preemptions and prefix-cache hits happened
   (/metrics), that the aborted streams were aborted, and that once idle the KV cache usage is
   back to 0.

Prints a summary table, writes JSON (``--json``) and exits 0 when every check passed.
The helpers (Server, make_workload, run_load, scrape_metrics, ...) are reused by
``benchmarks/soak.py`` and ``tests/test_load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The pattern of the tiny test model (tests/test_serve.py uses the same one): 4 layers x 2 KV
# heads, half of them retrieval heads at sparsity 0.5.
TINY_GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]
DEFAULT_SINK, DEFAULT_RECENT = 4, 16
DEFAULT_MAX_MODEL_LEN = 1024
DEFAULT_BLOCK_SIZE = 32
# Small enough that 64 concurrent requests of this mix cannot all keep their blocks (the
# scheduler preempts), large enough for one request of max_model_len tokens.
DEFAULT_KV_BYTES = 2_500_000
# Small, so most prompts are prefilled in several chunks, in steps shared with other requests'
# chunks and decodes (vLLM's CPU default for serve is 2048).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256
# A greedy step whose two best offline log-probabilities are closer than this is a tie: batch
# composition changes fp32 rounding by ~1e-6, which can flip such a step and nothing else.
TIE_TOLERANCE = 1e-4
SERVED_NAME = "duo-load"

_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from it an be this are or which have has "
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work number night "
    "passkey pass key remember hidden secret grass sky sun blue green yellow red answer capital"
)
_WORDS = _WORDS_TEXT.split()


# --------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    """The ``vllm`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("vllm")
    if not script.exists():
        raise FileNotFoundError(f"the vllm console script is missing next to {sys.executable}")
    return str(script)


def server_env(extra: Mapping[str, str] | None = None, *, tmpdir: str | None = None) -> dict:
    """The environment for a server: no stray VLLM_DUO_*, offline hub, a short TMPDIR.

    vLLM puts its ZMQ sockets under TMPDIR and their paths must stay under 107 bytes.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    env.update(extra or {})
    return env


class Server:
    """One ``vllm serve`` process group on 127.0.0.1, stopped by its process group."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str],
        duo: bool = True,
        served_name: str = SERVED_NAME,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        kv_cache_memory_bytes: int = DEFAULT_KV_BYTES,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        log_requests: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        self.log_path = Path(log_path)
        self.env = dict(env)
        self.command = [
            vllm_cli(), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", served_name, "--enforce-eager", "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--block-size", str(block_size),
            "--kv-cache-memory-bytes", str(kv_cache_memory_bytes), "--enable-prefix-caching",
            "--max-num-batched-tokens", str(max_num_batched_tokens),
            *(["--attention-backend", "DUO"] if duo else []),
            # Request logging is what tells client hang-ups apart: vLLM counts a client abort in
            # no metric, it only logs "Aborted request(s) ID" (prompts kept out of the log).
            *(["--enable-log-requests", "--max-log-len", "0"] if log_requests else []),
            *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Launch the process (returns at once; call :meth:`wait_healthy`)."""
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_healthy(self, timeout: float = 300.0) -> float:
        """Block until /health answers 200; returns the seconds waited."""
        assert self.proc is not None, "start() first"
        started = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            if health(self.base_url) == 200:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"server not healthy in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the process group (API server + engine core), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> Server:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def health(base_url: str) -> int:
    """HTTP status of GET /health, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# /metrics
# --------------------------------------------------------------------------------------------


def scrape_metrics(base_url: str) -> list[tuple[str, dict[str, str], float]]:
    """All samples of the Prometheus text at /metrics as (name, labels, value)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of Prometheus text as (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels = {}
        for part in label_text.rstrip("}").split('",'):
            if "=" in part:
                key, _, val = part.partition("=")
                labels[key.strip()] = val.strip().strip('"')
        samples.append((name, labels, float(value)))
    return samples


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample, got, value in samples
        if sample == name and all(got.get(k) == v for k, v in labels.items())
    )


# The figures a run reports; in vLLM 0.32 counters carry the Prometheus "_total" suffix and
# kv_cache_usage_perc is a fraction (1 = 100 %).
def metrics_summary(base_url: str) -> dict[str, float]:
    """The /metrics figures this benchmark reports."""
    s = scrape_metrics(base_url)
    return {
        "kv_cache_usage": metric(s, "vllm:kv_cache_usage_perc"),
        "running": metric(s, "vllm:num_requests_running"),
        "waiting": metric(s, "vllm:num_requests_waiting"),
        "preemptions": metric(s, "vllm:num_preemptions_total"),
        "prefix_cache_queries": metric(s, "vllm:prefix_cache_queries_total"),
        "prefix_cache_hits": metric(s, "vllm:prefix_cache_hits_total"),
        "prompt_tokens": metric(s, "vllm:prompt_tokens_total"),
        "generation_tokens": metric(s, "vllm:generation_tokens_total"),
        "finished_abort": metric(s, "vllm:request_success_total", finished_reason="abort"),
        "finished_length": metric(s, "vllm:request_success_total", finished_reason="length"),
        "finished_stop": metric(s, "vllm:request_success_total", finished_reason="stop"),
        "finished_error": metric(s, "vllm:request_success_total", finished_reason="error"),
    }


def wait_idle(base_url: str, timeout: float = 30.0) -> tuple[dict[str, float], float]:
    """Poll /metrics until nothing runs or waits and KV usage is 0; returns (last, seconds)."""
    started = time.monotonic()
    while True:
        summary = metrics_summary(base_url)
        idle = summary["running"] == 0 and summary["waiting"] == 0
        if (idle and summary["kv_cache_usage"] == 0) or time.monotonic() - started > timeout:
            return summary, time.monotonic() - started
        time.sleep(0.5)


def logged_aborts(log_path: str | os.PathLike[str], offset: int = 0) -> set[str]:
    """Request ids of the "Aborted request(s)" lines vLLM logged after byte ``offset``."""
    text = Path(log_path).read_bytes()[offset:].decode(errors="replace")
    ids: set[str] = set()
    for line in text.splitlines():
        _, found, rest = line.partition("Aborted request(s) ")
        if found:
            ids.update(i for i in rest.strip().rstrip(".").split(",") if i)
    return ids


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass
class RequestSpec:
    """One request of the load. ``abort_after``: streamed chunks read before hanging up."""

    index: int
    endpoint: str  # "completions" or "chat"
    group: str  # short | medium | long | prefix | chat
    stream: bool
    max_tokens: int
    prompt: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    abort_after: int | None = None

    def payload(self, model: str) -> dict[str, Any]:
        """The OpenAI request body: greedy, fixed length, token ids returned."""
        body: dict[str, Any] = {
            "model": model, "max_tokens": self.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, "stream": self.stream,
        }  # fmt: skip
        if self.endpoint == "chat":
            body["messages"] = self.messages
        else:
            body["prompt"] = self.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def token_pool(model: str | os.PathLike[str]) -> list[int]:
    """Token ids a synthetic prompt may use for ``model``.

    For the tiny test model: every ordinary id except lone non-ASCII bytes (they detokenize to
    replacement characters). Otherwise ids 1000..min(vocab, 30000): clear of special tokens.
    """
    config = json.loads((Path(model) / "config.json").read_text())
    vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
    if (Path(model) / "tiny_llama.json").is_file():
        from vllm_duo.testing.tiny_llama import NON_ASCII_BYTE_IDS, NUM_SPECIAL_TOKENS

        return [i for i in range(NUM_SPECIAL_TOKENS, vocab) if i not in NON_ASCII_BYTE_IDS]
    return list(range(min(1000, vocab // 2), min(vocab, 30000)))


def make_workload(
    n: int,
    *,
    seed: int,
    pool: Sequence[int],
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    sink: int = DEFAULT_SINK,
    recent: int = DEFAULT_RECENT,
    abort_fraction: float = 0.15,
) -> list[RequestSpec]:
    """A deterministic mix of ``n`` requests (same seed, same requests).

    Groups: short prompts inside S + W, medium ones a few windows long, long ones up to ~80 %
    of max_model_len, prompts sharing one of three long prefixes (prefix-cache hits), and chat
    requests. About half stream; ``abort_fraction`` of all requests are streams whose client
    hangs up after 1-3 chunks.
    """
    rng = random.Random(seed)
    window = sink + recent
    long_max = max(window + 2, int(0.8 * max_model_len) - 64)
    prefixes = [
        [rng.choice(pool) for _ in range(rng.randint(window * 8, window * 16))] for _ in range(3)
    ]
    groups = ["short", "medium", "long", "prefix", "prefix", "chat", "medium", "short", "long"]
    specs = []
    for index in range(n):
        group = groups[index % len(groups)]
        max_tokens = rng.randint(8, 40)
        prompt: list[int] | None = None
        messages = None
        if group == "short":
            prompt = [rng.choice(pool) for _ in range(rng.randint(1, window))]
        elif group == "medium":
            prompt = [rng.choice(pool) for _ in range(rng.randint(window + 1, window * 8))]
        elif group == "long":
            length = rng.randint(long_max // 2, long_max)
            prompt = [rng.choice(pool) for _ in range(length)]
            max_tokens = rng.randint(16, 64)
        elif group == "prefix":
            suffix = [rng.choice(pool) for _ in range(rng.randint(1, 3 * window))]
            prompt = prefixes[index % len(prefixes)] + suffix
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 120)))
            messages = [{"role": "user", "content": words}]
        stream = rng.random() < 0.5
        abort_after = None
        if rng.random() < abort_fraction:
            stream = True
            abort_after = rng.randint(1, 3)
            # Hang up well before the end, so the server still has work to abort.
            max_tokens = max(max_tokens, 32)
        if prompt is not None:
            max_tokens = min(max_tokens, max_model_len - len(prompt))
        specs.append(
            RequestSpec(
                index=index, endpoint="chat" if messages else "completions", group=group,
                stream=stream, max_tokens=max_tokens, prompt=prompt, messages=messages,
                abort_after=abort_after,
            )
        )  # fmt: skip
    # Interleave groups in time without losing determinism.
    rng.shuffle(specs)
    return specs


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """What the server answered to one request."""

    index: int
    status: int = 0
    completed: bool = False  # finished normally (finish_reason seen, all tokens received)
    aborted: bool = False  # the client hung up on purpose
    error: str | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    chunks: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    sent_at: float = 0.0  # perf_counter when the request left the client
    done_at: float = 0.0  # perf_counter when its answer ended (or the client hung up)


async def send(
    session: Any,
    base_url: str,
    model: str,
    spec: RequestSpec,
    on_chunk: Callable[[RequestResult], None] | None = None,
) -> RequestResult:
    """Send one request; for streams read server-sent events, hang up after ``abort_after``.

    ``on_chunk`` is called with the result so far after every streamed chunk.
    """
    result = RequestResult(index=spec.index)
    started = time.perf_counter()
    try:
        async with session.post(base_url + spec.path, json=spec.payload(model)) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:500]
            elif not spec.stream:
                body = await response.json()
                choice = body["choices"][0]
                result.token_ids = list(choice.get("token_ids") or [])
                result.prompt_token_ids = body.get("prompt_token_ids") or choice.get(
                    "prompt_token_ids"
                )
                result.finish_reason = choice.get("finish_reason")
                result.ttft_s = time.perf_counter() - started
            else:
                await _read_stream(response, spec, result, started, on_chunk)
    except Exception as exc:  # a benchmark reports every failure instead of stopping
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency_s = time.perf_counter() - started
    result.completed = (
        result.error is None
        and not result.aborted
        and result.finish_reason is not None
        and len(result.token_ids) == spec.max_tokens
    )
    return result


async def _read_stream(
    response: Any,
    spec: RequestSpec,
    result: RequestResult,
    started: float,
    on_chunk: Callable[[RequestResult], None] | None,
) -> None:
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = json.dumps(chunk["error"])[:500]
            return
        if chunk.get("prompt_token_ids"):
            result.prompt_token_ids = chunk["prompt_token_ids"]
        for choice in chunk.get("choices", []):
            if choice.get("prompt_token_ids"):
                result.prompt_token_ids = choice["prompt_token_ids"]
            ids = choice.get("token_ids") or []
            if ids and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - started
            result.token_ids.extend(ids)
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        result.chunks += 1
        if on_chunk is not None:
            on_chunk(result)
        if spec.abort_after is not None and result.chunks >= spec.abort_after:
            # Hang up: close the connection itself (not just stop reading), as a client that
            # dies or times out would; the server must abort the request and free its blocks.
            result.aborted = True
            response.close()
            return


async def run_load(
    base_url: str,
    model: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int,
    request_timeout: float = 300.0,
    load_timeout: float = 900.0,
) -> tuple[list[RequestResult], float, dict[str, float]]:
    """Send ``specs`` with at most ``concurrency`` in flight.

    Returns (results, wall seconds, peaks): peaks are the largest running / waiting request
    counts and KV cache usage that /metrics showed while the load ran (sampled every 0.25 s,
    so a fast machine can finish the busy part between two samples), and ``in_flight``: the
    most requests the server had been sent and not yet finished at one moment, from the
    client's own timestamps, which no sampling can miss.
    """
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    connector = aiohttp.TCPConnector(limit=concurrency)
    peaks = {"running": 0.0, "waiting": 0.0, "in_server": 0.0, "kv_cache_usage": 0.0}
    done = asyncio.Event()

    async def watch() -> None:
        # Its own session: the load's connection pool is full by design.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not done.is_set():
                try:
                    async with session.get(f"{base_url}/metrics") as response:
                        samples = parse_metrics(await response.text())
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    samples = []
                if samples:
                    running = metric(samples, "vllm:num_requests_running")
                    waiting = metric(samples, "vllm:num_requests_waiting")
                    usage = metric(samples, "vllm:kv_cache_usage_perc")
                    for key, value in (("running", running), ("waiting", waiting),
                                       ("in_server", running + waiting),
                                       ("kv_cache_usage", usage)):  # fmt: skip
                        peaks[key] = max(peaks[key], value)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=0.25)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(spec: RequestSpec) -> RequestResult:
            async with semaphore:
                sent_at = time.perf_counter()
                result = await send(session, base_url, model, spec)
                result.sent_at, result.done_at = sent_at, time.perf_counter()
                return result

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(one(spec) for spec in specs)), timeout=load_timeout
            )
        finally:
            wall_s = time.perf_counter() - started
            done.set()
            await watcher
    peaks["in_flight"] = float(peak_overlap([(r.sent_at, r.done_at) for r in results]))
    return list(results), wall_s, peaks


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most half-open intervals [start, end) that contain one moment."""
    # At equal times an end sorts before a start: a request that ended as another began
    # was not in flight with it.
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------------------------
# Offline reference: every request alone in an offline engine
# --------------------------------------------------------------------------------------------


def offline_reference(
    model: str | os.PathLike[str],
    specs: Sequence[RequestSpec],
    *,
    env: Mapping[str, str],
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    block_size: int = DEFAULT_BLOCK_SIZE,
    workdir: str | os.PathLike[str],
    timeout: float = 900.0,
) -> list[dict[str, Any]]:
    """Run each spec alone (one ``generate``/``chat`` call each) with DUO in a child process.

    The engine has prefix caching off and a roomy KV cache, so no request shares, waits for or
    is preempted by another: the plainest run of the same model, settings and prompt. Returns,
    per spec: prompt_token_ids, token_ids and the two best log-probabilities of each step.
    """
    workdir = Path(workdir)
    request = workdir / "offline-request.json"
    result = workdir / "offline-result.json"
    request.write_text(json.dumps({
        "model": str(model), "max_model_len": max_model_len, "block_size": block_size,
        "specs": [asdict(s) for s in specs],
    }))  # fmt: skip
    child_env = dict(env)
    child_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run(
        [sys.executable, __file__, "_offline", str(request), str(result)],
        env=child_env, capture_output=True, text=True, timeout=timeout, cwd=workdir,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"offline reference failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(result.read_text())


def _offline_worker(request_path: str, result_path: str) -> None:
    """Child process of :func:`offline_reference`."""
    request = json.loads(Path(request_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=request["model"], attention_backend="DUO", enforce_eager=True, dtype="float32",
        max_model_len=request["max_model_len"], block_size=request["block_size"],
        enable_prefix_caching=False, kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    rows = []
    for raw in request["specs"]:
        spec = RequestSpec(**raw)
        params = SamplingParams(
            temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True, logprobs=2
        )
        if spec.endpoint == "chat":
            out = llm.chat(spec.messages, params, use_tqdm=False)[0]
        else:
            out = llm.generate([{"prompt_token_ids": spec.prompt}], params, use_tqdm=False)[0]
        completion = out.outputs[0]
        top2 = [
            sorted(((int(t), float(lp.logprob)) for t, lp in step.items()), key=lambda x: -x[1])[:2]
            for step in completion.logprobs
        ]
        rows.append({
            "index": spec.index, "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(completion.token_ids), "top2": top2,
        })  # fmt: skip
    Path(result_path).write_text(json.dumps(rows))


def compare(result: RequestResult, reference: Mapping[str, Any]) -> tuple[str, str]:
    """Classify a completed request against its offline run: ``equal``, ``tie`` or ``differs``.

    ``tie``: the first differing step is one where the offline engine's two best tokens are
    within TIE_TOLERANCE and the server picked the other of the two; later steps then follow a
    different (equally valid) greedy path and are not compared.
    """
    if (
        result.prompt_token_ids is not None
        and result.prompt_token_ids != reference["prompt_token_ids"]
    ):
        return "differs", "prompt token ids differ from the offline engine's"
    want, got = reference["token_ids"], result.token_ids
    if got == want:
        return "equal", ""
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    detail = (
        f"first difference at step {step}: server {got[step : step + 3]} "
        f"offline {want[step : step + 3]}"
    )
    top2 = reference["top2"][step] if step < len(reference["top2"]) else []
    if len(top2) == 2 and step < len(got):
        (_, best_lp), (second, second_lp) = top2
        gap = best_lp - second_lp
        detail += f", offline top-2 gap {gap:.2e}"
        if gap < TIE_TOLERANCE and got[step] == second:
            return "tie", detail
    return "differs", detail


# --------------------------------------------------------------------------------------------
# One whole run
# --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def evaluate(
    specs: Sequence[RequestSpec],
    results: Sequence[RequestResult],
    references: Sequence[Mapping[str, Any]] | None,
    *,
    wall_s: float,
    before: Mapping[str, float],
    after: Mapping[str, float],
    idle_s: float,
    health_after: int,
    server_aborts: int | None = None,
) -> dict[str, Any]:
    """Summary figures and pass/fail checks of one load run."""
    by_index = {r.index: r for r in results}
    ref_by_index = {r["index"]: r for r in references or []}
    verdicts: dict[str, int] = {"equal": 0, "tie": 0, "differs": 0}
    details = []
    for spec in specs:
        result = by_index[spec.index]
        if result.completed and spec.index in ref_by_index:
            verdict, detail = compare(result, ref_by_index[spec.index])
            verdicts[verdict] += 1
            if verdict != "equal":
                details.append({"index": spec.index, "group": spec.group, "verdict": verdict,
                                "detail": detail})  # fmt: skip
    completed = [r for r in results if r.completed]
    aborted = [r for r in results if r.aborted]
    failed = [r for r in results if not r.completed and not r.aborted]
    expected_aborts = sum(1 for s in specs if s.abort_after is not None)
    tokens = sum(len(r.token_ids) for r in results)
    delta = {k: after[k] - before[k] for k in before}
    latencies = [r.latency_s for r in completed]
    ttfts = [r.ttft_s for r in completed if r.ttft_s is not None]
    summary = {
        "requests": len(specs),
        "completed": len(completed),
        "aborted_by_client": len(aborted),
        "aborted_expected": expected_aborts,
        "failed": len(failed),
        "failures": [{"index": r.index, "status": r.status, "error": r.error} for r in failed][:20],
        "streaming": sum(s.stream for s in specs),
        "chat": sum(s.endpoint == "chat" for s in specs),
        "compared": sum(verdicts.values()),
        **{f"offline_{k}": v for k, v in verdicts.items()},
        "mismatches": details,
        "wall_s": wall_s,
        "tokens_received": tokens,
        "tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p95_s": percentile(ttfts, 0.95),
        "preemptions": delta["preemptions"],
        "prefix_cache_hits": delta["prefix_cache_hits"],
        "prefix_cache_queries": delta["prefix_cache_queries"],
        # None when the server's log is not ours to read (--url).
        "server_aborts": server_aborts,
        "generation_tokens": delta["generation_tokens"],
        "generation_tokens_requested": sum(s.max_tokens for s in specs),
        "server_errors": delta["finished_error"],
        "kv_cache_usage_after": after["kv_cache_usage"],
        "running_after": after["running"],
        "waiting_after": after["waiting"],
        "seconds_to_idle": idle_s,
        "health_after": health_after,
    }
    checks = {
        "no failed requests": not failed,
        "every aborting client hung up": len(aborted) == expected_aborts,
        # The server must stop generating for clients that hung up: it logs the aborts and
        # generates fewer tokens than were requested in all.
        "server aborted the hung-up streams": not aborted
        or (
            (server_aborts is None or server_aborts >= 1)
            and delta["generation_tokens"] < sum(s.max_tokens for s in specs)
        ),
        "completed == offline (ties allowed)": references is not None
        and verdicts["differs"] == 0
        and sum(verdicts.values()) == len(completed),
        "preemption happened": delta["preemptions"] > 0,
        "prefix cache hit": delta["prefix_cache_hits"] > 0,
        "kv cache usage back to 0": after["kv_cache_usage"] == 0,
        "nothing running or waiting": after["running"] == 0 and after["waiting"] == 0,
        "/health 200 after": health_after == 200,
    }
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    return summary


def run(
    *,
    base_url: str,
    served_name: str,
    model: str | os.PathLike[str],
    specs: Sequence[RequestSpec],
    concurrency: int,
    offline_env: Mapping[str, str] | None,
    workdir: str | os.PathLike[str],
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    block_size: int = DEFAULT_BLOCK_SIZE,
    request_timeout: float = 300.0,
    load_timeout: float = 900.0,
    log_path: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """Load a running server, then check it against the offline engine (``offline_env`` None:
    skip the offline comparison). ``log_path``: the server's log, started with request
    logging, to count the aborts it logged. Returns (summary, results)."""
    before = metrics_summary(base_url)
    log_offset = Path(log_path).stat().st_size if log_path else 0
    results, wall_s, peaks = asyncio.run(
        run_load(base_url, served_name, specs, concurrency=concurrency,
                 request_timeout=request_timeout, load_timeout=load_timeout)
    )  # fmt: skip
    after, idle_s = wait_idle(base_url)
    health_after = health(base_url)
    references = None
    if offline_env is not None:
        completed = {r.index for r in results if r.completed}
        references = offline_reference(
            model, [s for s in specs if s.index in completed], env=offline_env,
            max_model_len=max_model_len, block_size=block_size, workdir=workdir,
        )  # fmt: skip
    server_aborts = len(logged_aborts(log_path, log_offset)) if log_path else None
    summary = evaluate(specs, results, references, wall_s=wall_s, before=before, after=after,
                       idle_s=idle_s, health_after=health_after,
                       server_aborts=server_aborts)  # fmt: skip
    summary["concurrency"] = concurrency
    summary.update({f"peak_{k}": v for k, v in peaks.items()})
    return summary, results


def print_summary(summary: Mapping[str, Any]) -> None:
    """The human-readable table of one run."""
    rows = [
        ("requests (streaming, chat)",
         f"{summary['requests']} ({summary['streaming']}, {summary['chat']})"),
        ("completed / aborted by client / failed",
         f"{summary['completed']} / {summary['aborted_by_client']} / {summary['failed']}"),
        ("equal to offline / ties / differ",
         f"{summary['offline_equal']} / {summary['offline_tie']} / {summary['offline_differs']}"
         f" of {summary['compared']}"),
        ("client concurrency; peak in flight; sampled running / waiting",
         f"{summary.get('concurrency')}; {summary.get('peak_in_flight', 0):.0f}; "
         f"{summary.get('peak_running', 0):.0f} / {summary.get('peak_waiting', 0):.0f}"),
        ("sampled peak KV cache usage", f"{summary.get('peak_kv_cache_usage', 0):.2f}"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("tokens received, per second",
         f"{summary['tokens_received']}, {summary['tokens_per_s']:.1f}/s"),
        ("latency p50 / p95", f"{summary['latency_p50_s']:.2f} / {summary['latency_p95_s']:.2f} s"),
        ("TTFT p50 / p95", f"{summary['ttft_p50_s']:.2f} / {summary['ttft_p95_s']:.2f} s"),
        ("preemptions (/metrics)", f"{summary['preemptions']:.0f}"),
        ("prefix cache hits / queries (tokens)",
         f"{summary['prefix_cache_hits']:.0f} / {summary['prefix_cache_queries']:.0f}"),
        ("aborts logged by the server",
         "n/a" if summary["server_aborts"] is None else str(summary["server_aborts"])),
        ("tokens generated / requested",
         f"{summary['generation_tokens']:.0f} / {summary['generation_tokens_requested']}"),
        ("KV cache usage after", f"{summary['kv_cache_usage_after']:g} "
         f"(idle after {summary['seconds_to_idle']:.1f} s)"),
        ("/health after", str(summary["health_after"])),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for name, ok in summary["checks"].items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    for item in summary["mismatches"][:10]:
        print(f"  request {item['index']} ({item['group']}): {item['verdict']}: {item['detail']}")
    for item in summary["failures"][:10]:
        print(f"  request {item['index']} failed: status {item['status']}: {item['error']}")


def write_tiny_setup(root: Path) -> tuple[Path, Path]:
    """The tiny fp32 test model and its pattern under ``root`` (reused when present)."""
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    model = build_tiny_llama(root / "tiny-gqa", num_layers=4, num_heads=4, num_kv_heads=2)
    pattern = root / "tiny-gqa-pattern"
    pattern.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(repr(g) for g in row) for row in TINY_GATES]
    (pattern / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    return model, pattern


def duo_env(pattern: str | os.PathLike[str] | None, sink: int, recent: int) -> dict[str, str]:
    """The VLLM_DUO_* settings of a run."""
    env = {"VLLM_DUO_SINK": str(sink), "VLLM_DUO_RECENT": str(recent)}
    if pattern is not None:
        env["VLLM_DUO_PATTERN"] = str(pattern)
    return env


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", help="model directory (default: the tiny fp32 test Llama)")
    parser.add_argument("--pattern", help="VLLM_DUO_PATTERN (default: the tiny model's pattern)")
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK)
    parser.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_KV_BYTES)
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS
    )
    parser.add_argument("--abort-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--load-timeout", type=float, default=900.0)
    parser.add_argument(
        "--server-args",
        default="",
        help='more `vllm serve` flags, e.g. "--max-num-batched-tokens 128"',
    )
    parser.add_argument("--url", help="load this running server instead of starting one")
    parser.add_argument("--served-model-name", default=SERVED_NAME)
    parser.add_argument("--no-offline", action="store_true", help="skip the offline comparison")
    parser.add_argument("--workdir", help="where logs and scratch files go (default: a temp dir)")
    parser.add_argument("--json", help="summary and per-request results (WORKDIR/load.json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="duo-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args.json = args.json or str(workdir / "load.json")
    cache = Path(os.environ.get("VLLM_DUO_CACHE_DIR", Path.home() / ".cache" / "vllm-duo"))
    if args.model:
        model, pattern = Path(args.model), args.pattern
    else:
        model, tiny_pattern = write_tiny_setup(cache / "load-test")
        pattern = args.pattern or tiny_pattern
    settings = duo_env(pattern, args.sink, args.recent)
    # Short: ZMQ socket paths under TMPDIR must stay below 107 bytes.
    sockets = tempfile.mkdtemp(prefix="vd", dir="/tmp")
    env = server_env(settings, tmpdir=sockets)
    specs = make_workload(args.requests, seed=args.seed, pool=token_pool(model),
                          max_model_len=args.max_model_len, sink=args.sink, recent=args.recent,
                          abort_fraction=args.abort_fraction)  # fmt: skip
    server = None
    try:
        if args.url:
            base_url, name = args.url.rstrip("/"), args.served_model_name
        else:
            server = Server(model, log_path=workdir / "server.log", env=env,
                            max_model_len=args.max_model_len, block_size=args.block_size,
                            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            extra_args=shlex.split(args.server_args))  # fmt: skip
            server.start()
            print(f"starting server (log: {server.log_path}) ...", flush=True)
            print(f"server healthy after {server.wait_healthy():.1f} s", flush=True)
            base_url, name = server.base_url, server.served_name
        summary, results = run(
            base_url=base_url, served_name=name, model=model, specs=specs,
            concurrency=args.concurrency, offline_env=None if args.no_offline else env,
            workdir=workdir, max_model_len=args.max_model_len, block_size=args.block_size,
            request_timeout=args.request_timeout, load_timeout=args.load_timeout,
            log_path=server.log_path if server is not None else None,
        )  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    if args.no_offline:
        summary["checks"].pop("completed == offline (ties allowed)")
        summary["passed"] = all(summary["checks"].values())
    print_summary(summary)
    Path(args.json).write_text(json.dumps({
        "summary": summary, "args": vars(args),
        "requests": [asdict(s) for s in specs], "results": [asdict(r) for r in results],
    }, indent=1))  # fmt: skip
    print(f"wrote {args.json}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_offline":
        _offline_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
