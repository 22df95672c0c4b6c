"""``vllm-duo bench``: settings, the ideal ratios, the report, and one small real run."""

from __future__ import annotations

import json
import os

import pytest

from vllm_duo.bench import report
from vllm_duo.bench.config import (
    BenchConfig,
    SyntheticModel,
    ideal_decode_ratio,
    ideal_prefill_ratio,
)
from vllm_duo.cli import main
from vllm_duo.errors import DuoConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BAD_CONFIGS = [
    ({"contexts": ()}, "--contexts is empty"),
    ({"contexts": (4096, 2048)}, "increasing"),
    ({"contexts": (1,)}, "context length 1"),
    ({"sparsity": 1.5}, "--sparsity 1.5"),
    ({"sink": -1}, "--sink -1"),
    ({"recent": 0}, "--recent 0"),
    ({"decode_tokens": 2}, "--decode-tokens 2"),
    ({"concurrency": 0}, "--concurrency 0"),
    ({"max_num_batched_tokens": 8}, "--max-num-batched-tokens 8"),
    ({"dtype": "int8"}, "--dtype 'int8'"),
    ({"kv_cache_gib": 0.0}, "--kv-cache-gib 0.0"),
    ({"kv_cache_dtype": "int8"}, "--kv-cache-dtype 'int8' must be one of auto, fp8"),
    ({"stock_kv_cache_dtype": "fp4"}, "--stock-kv-cache-dtype 'fp4'"),
    ({"rounds": 0}, "--rounds 0 must be an integer in"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_CONFIGS)
def test_bad_settings_name_the_flag(kwargs, named):
    with pytest.raises(DuoConfigError, match=named.replace("(", r"\(")):
        BenchConfig(**kwargs)


def test_rounds_merge_to_the_median_of_each_number():
    from vllm_duo.bench.run import median_rows

    def rows(prefill, decode):
        return [{"kind": "engine", "startup_s": 1.0},
                {"kind": "context", "context": 4096, "prefill_s": prefill,
                 "decode_s_per_token": decode, "decode_samples": 31}]  # fmt: skip

    one = rows(2.0, 0.01)
    assert median_rows([one]) is one
    merged = median_rows([rows(2.0, 0.010), rows(4.0, 0.030), rows(3.0, 0.011)])
    context = merged[1]
    assert context["prefill_s"] == 3.0 and context["decode_s_per_token"] == 0.011
    assert context["context"] == 4096 and context["decode_samples"] == 31
    assert [r["prefill_s"] for r in context["rounds"]] == [2.0, 4.0, 3.0]


def test_synthetic_model_rejects_zero_layers():
    with pytest.raises(DuoConfigError, match="num_layers=0"):
        SyntheticModel(num_layers=0)


def test_ideal_ratios_against_direct_counts():
    # Decode: 32K context, half the heads streaming, S+W = 320 -> 32768 / (16384 + 160).
    assert ideal_decode_ratio(32768, 0.5, 64, 256) == pytest.approx(32768 / 16544)
    # Shorter than S+W: nothing to save.
    assert ideal_decode_ratio(100, 0.5, 64, 256) == pytest.approx(1.0)
    # Prefill: count the keys every query scores on each kind of head.
    for length, sink, recent in [(1, 0, 1), (50, 3, 7), (333, 5, 64), (64, 64, 256)]:
        full = sum(p + 1 for p in range(length))
        stream = sum(min(p + 1, sink + recent) for p in range(length))
        want = full / (0.25 * full + 0.75 * stream)
        assert ideal_prefill_ratio(length, 0.25, sink, recent) == pytest.approx(want)


def _row(context, prefill, decode, throughput, kv, concurrency):
    return {"context": context, "prefill_s": prefill, "decode_s_per_token": decode,
            "throughput_tok_s": throughput, "kv_bytes_per_token": kv,
            "max_concurrency": concurrency}  # fmt: skip


def test_report_ratios_point_the_right_way():
    stock = [_row(1024, 2.0, 0.02, 50.0, 4096.0, 10.0), _row(2048, 4.0, 0.04, 25.0, 4096.0, 5.0)]
    duo = [_row(2048, 2.0, 0.01, 100.0, 2048.0, 9.0)]
    rows = report.compare(stock, duo, retrieval_fraction=0.5, sink=4, recent=12)
    assert [r["context"] for r in rows] == [2048]  # only lengths both measured
    row = rows[0]
    assert row["prefill_s"]["ratio"] == pytest.approx(2.0)  # time: stock / duo
    assert row["decode_s_per_token"]["ratio"] == pytest.approx(4.0)
    assert row["throughput_tok_s"]["ratio"] == pytest.approx(4.0)  # rate: duo / stock
    assert row["kv_bytes_per_token"]["ratio"] == pytest.approx(2.0)
    assert row["max_concurrency"]["ratio"] == pytest.approx(1.8)
    assert row["decode_s_per_token"]["ideal"] == pytest.approx(2048 / (1024 + 8))
    lines = report.table(rows)
    assert any("4.00x" in line for line in lines)


def test_fp8_multiplies_the_kv_bytes_ideals():
    """DUO with an fp8 cache against stock in bf16: twice the decode (KV bytes) ideal."""
    assert BenchConfig(kv_cache_dtype="fp8").kv_dtype_gain == 2
    assert BenchConfig(kv_cache_dtype="fp8", dtype="float32").kv_dtype_gain == 4
    assert BenchConfig(kv_cache_dtype="fp8_e5m2", stock_kv_cache_dtype="fp8").kv_dtype_gain == 1
    stock, duo = [_row(2048, 2.0, 0.02, 50.0, 4096.0, 10.0)], [_row(2048, 2.0, 0.02, 50.0, 1.0, 1)]
    plain = report.compare(stock, duo, retrieval_fraction=0.5, sink=4, recent=12)[0]
    fp8 = report.compare(stock, duo, retrieval_fraction=0.5, sink=4, recent=12,
                         kv_dtype_gain=2.0)[0]  # fmt: skip
    for key in ("max_concurrency", "kv_bytes_per_token", "decode_s_per_token"):
        assert fp8[key]["ideal"] == pytest.approx(2 * plain[key]["ideal"])
    assert fp8["prefill_s"]["ideal"] == pytest.approx(plain["prefill_s"]["ideal"])


def test_cli_rejects_bad_contexts_in_one_line(capsys):
    assert main(["bench", "--contexts", "4K,eight"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'eight' is not a token count" in err[0]


def test_cli_needs_a_pattern_for_a_local_model(capsys, tmp_path):
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert "needs --pattern" in capsys.readouterr().err


@pytest.mark.slow
def test_small_real_run_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    """Both backends in real vLLM on a 1-layer Llama-3-shaped model: memory figures are
    deterministic and must favour DUO; times are only checked to exist."""
    monkeypatch.setenv("VLLM_CACHE_ROOT", os.environ.get("VLLM_CACHE_ROOT", str(tmp_path / "c")))
    out = tmp_path / "bench"
    argv = ["bench", "--contexts", "512,1024", "--decode-tokens", "4", "--concurrency", "2",
            "--sink", "16", "--recent", "32", "--num-layers", "1", "--hidden-size", "256",
            "--intermediate-size", "256", "--kv-cache-gib", "0.25", "--dtype", "float32",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "DUO/stock ratio" in printed and "1,024" in printed
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["retrieval_fraction"] == pytest.approx(0.5)
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
    rows = {row["context"]: row for row in data["rows"]}
    assert sorted(rows) == [512, 1024]
    for row in rows.values():
        for side in ("stock", "duo"):
            assert row[side]["prefill_s"] > 0 and row[side]["decode_s_per_token"] > 0
            # The concurrent requests found the single request's prompt in the cache.
            assert row[side]["throughput_prefix_hit_tokens"] > 0
    long = rows[1024]
    # Half the heads keep 16 + 32 tokens; block granularity (CPU blocks of 128) costs some.
    assert 1.3 < long["kv_bytes_per_token"]["ratio"] <= long["kv_bytes_per_token"]["ideal"]
    # vLLM admits a streaming request for sink + two windows of blocks (in-flight chunks):
    # 1 + 2 * 2 blocks against 8 full-context ones at 1,024 tokens -> 16 / 13.
    assert long["max_concurrency"]["ratio"] == pytest.approx(16 / 13, rel=0.02)
    assert long["stock"]["kv_bytes_per_token"] == pytest.approx(8 * 128 * 2 * 4, rel=0.15)
