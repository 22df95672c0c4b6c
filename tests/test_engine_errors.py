"""Bad settings and unsupported models stop vLLM at start-up with one clear line."""

from __future__ import annotations

import pytest
from conftest import run_engine, write_pattern

pytestmark = pytest.mark.slow

PROMPT = [[7, 8, 9]]


def _error_line(log: str) -> str:
    """The DuoConfigError line of a failed start-up."""
    lines = [ln for ln in log.splitlines() if "DuoConfigError:" in ln or "Value error, " in ln]
    assert lines, f"no DuoConfigError in the log:\n{log[-3000:]}"
    return lines[-1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VLLM_DUO_SPARSITY": "1.5"}, ["VLLM_DUO_SPARSITY='1.5'", "[0, 1]"]),
        ({"VLLM_DUO_PATTERN": "/nonexistent/pattern"}, ["VLLM_DUO_PATTERN", "/nonexistent"]),
        ({"VLLM_DUO_SPARSITY": "0.5", "VLLM_DUO_THRESHOLD": "0.3"},
         ["VLLM_DUO_SPARSITY", "VLLM_DUO_THRESHOLD"]),
        ({"VLLM_DUO_RECENT": "-3"}, ["VLLM_DUO_RECENT='-3'"]),
        ({"VLLM_DUO_SINK": "6.4"}, ["VLLM_DUO_SINK='6.4'"]),
        ({}, ["no bundled DuoAttention pattern matches", "VLLM_DUO_PATTERN"]),
    ],
    ids=["sparsity-range", "missing-pattern", "both-selectors", "negative-recent",
         "float-sink", "no-pattern-for-model"],
)  # fmt: skip
def test_bad_settings_fail_at_startup(tmp_path, tiny_gqa, env, expected):
    if env and "VLLM_DUO_PATTERN" not in env and "no-pattern" not in str(expected):
        env = {"VLLM_DUO_PATTERN": str(write_pattern(tmp_path / "p", [[1, 0]] * 4)), **env}
    log = run_engine(tmp_path, tiny_gqa, PROMPT, env=env, expect_failure=True)
    line = _error_line(log)
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"


def test_pattern_of_wrong_shape_is_refused(tmp_path, tiny_gqa):
    pattern = write_pattern(tmp_path / "p", [[1, 0, 1]] * 3)
    log = run_engine(tmp_path, tiny_gqa, PROMPT, env={"VLLM_DUO_PATTERN": str(pattern)},
                     expect_failure=True)  # fmt: skip
    line = _error_line(log)
    assert "3x3" in line and "4x2" in line


def test_malformed_pattern_is_refused(tmp_path, tiny_gqa):
    pattern = tmp_path / "p"
    pattern.mkdir()
    (pattern / "full_attention_heads.tsv").write_text("1\t0\n1\tnan\n1\t0\n0\t1\n")
    log = run_engine(tmp_path, tiny_gqa, PROMPT, env={"VLLM_DUO_PATTERN": str(pattern)},
                     expect_failure=True)  # fmt: skip
    assert "nan" in _error_line(log).lower()


def test_fp8_kv_cache_is_refused_where_vllm_cpu_attention_refuses_it(tmp_path, tmp_path_factory):
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    # vLLM's CPU fp8 attention needs head sizes divisible by 32; the stock backend fails on
    # such a model too, but only when its first cache is built.
    model = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-d80", head_dim=80)
    pattern = write_pattern(tmp_path / "p", [[1, 0]] * 4)
    log = run_engine(tmp_path, model, PROMPT, env={"VLLM_DUO_PATTERN": str(pattern)},
                     kv_cache_dtype="fp8", expect_failure=True)  # fmt: skip
    line = _error_line(log)
    assert "--kv-cache-dtype fp8" in line and "head_size=80" in line, line
    assert "--kv-cache-dtype auto" in line, line


def test_sliding_window_model_is_refused(tmp_path, tmp_path_factory):
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-sliding", sliding_window=64)
    pattern = write_pattern(tmp_path / "p", [[1, 0]] * 4)
    log = run_engine(tmp_path, model, PROMPT, env={"VLLM_DUO_PATTERN": str(pattern)},
                     expect_failure=True)  # fmt: skip
    assert "sliding_window" in _error_line(log)
