"""``vllm serve --attention-backend DUO`` answers OpenAI requests like the reference."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Reference, engine_env, write_pattern

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import synthetic_prompt_ids

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 16
GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]
STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_cli() -> list[str]:
    script = Path(sys.executable).with_name("vllm")
    assert script.exists(), f"the vllm console script is missing next to {sys.executable}"
    return [str(script)]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gqa):
    tmp = tmp_path_factory.mktemp("serve")
    pattern = write_pattern(tmp / "pattern", GATES)
    port = _free_port()
    env = engine_env(tmp, {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(SINK),
                           "VLLM_DUO_RECENT": str(RECENT),
                           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})  # fmt: skip
    log_path = tmp / "server.log"
    command = [*_vllm_cli(), "serve", str(tiny_gqa), "--attention-backend", "DUO",
               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
               "--dtype", "float32", "--max-model-len", "1024",
               "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "tiny"]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in time"
            time.sleep(1)
        yield base, log_path
    finally:
        # Stop the server (and its engine core) by its PID's process group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def reference(tiny_gqa, tmp_path_factory):
    pattern = write_pattern(tmp_path_factory.mktemp("ref-pattern"), GATES)
    mask = select_retrieval(load_gates(pattern), sparsity=0.5)
    return Reference(tiny_gqa, mask, SINK, RECENT)


def _greedy(reference: Reference, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(steps):
        token = int(reference.logprobs(ids)[-1].argmax())
        out.append(token)
        ids.append(token)
    return out


def test_completions_match_reference(server, reference):
    base, log_path = server
    prompt = synthetic_prompt_ids(120, seed=7, vocab_size=512)
    body = _post(f"{base}/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    })  # fmt: skip
    choice = body["choices"][0]
    assert choice["token_ids"] == _greedy(reference, prompt, 6)
    assert isinstance(choice["text"], str)
    log = log_path.read_text()
    assert "DuoAttention: pattern" in log
    assert "Unknown vLLM environment variable" not in log


def test_chat_completions_match_reference(server, reference, tiny_gqa):
    from transformers import AutoTokenizer

    base, _ = server
    messages = [{"role": "user", "content": "the number of the day is seven " * 12}]
    body = _post(f"{base}/v1/chat/completions", {
        "model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    })  # fmt: skip
    choice = body["choices"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_gqa)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    assert body.get("prompt_token_ids", ids) == ids
    assert choice["token_ids"] == _greedy(reference, ids, 5)
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
