"""``vllm-duo eval``: settings, scoring, agreement maths, the report, and one small real run."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from vllm_duo.cli import main
from vllm_duo.errors import DuoConfigError
from vllm_duo.evaluation import report
from vllm_duo.evaluation.agreement import position_bins, summarise, token_agreement
from vllm_duo.evaluation.config import EvalConfig, default_depths, default_lengths

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, **overrides) -> EvalConfig:
    base = {"model": tmp_path, "pattern": tmp_path / "p", "out": tmp_path / "out",
            "max_context": 8192, "lengths": (1024, 2048), "depths": (0.25, 0.75),
            "sweep_lengths": (1024,), "agreement_length": 2048}  # fmt: skip
    return EvalConfig(**{**base, **overrides})


BAD = [
    ({"methods": ("full", "fast")}, "--methods=full,fast: 'fast' is not one of"),
    ({"methods": ()}, "--methods="),
    ({"methods": ("full", "duo", "baseline")}, "--baseline DIR and the method 'baseline'"),
    ({"methods": ("duo",)}, "keep both in --methods"),
    ({"families": ("held",)}, "--families=held: 'held' is not one of"),
    ({"parts": ("niah", "niah")}, "needs distinct values"),
    ({"sparsity": 1.5}, "--sparsity: 1.5 is out of range"),
    ({"sparsities": (0.5, float("nan"))}, "--sparsities: nan is out of range"),
    ({"depths": (0.5, 0.25)}, "--depths: expected distinct increasing"),
    ({"depths": (0.5, 1.2)}, "--depths: 1.2 is out of range"),
    ({"lengths": (1024, 8190)}, "--lengths: 8190 tokens is out of range"),
    ({"lengths": (100,)}, "--lengths: 100 tokens is out of range"),
    ({"sweep_lengths": (2048, 1024)}, "--sweep-lengths: expected distinct increasing"),
    ({"per_cell": 0}, "--per-cell=0 is invalid"),
    ({"agreement_length": 300}, "--agreement-length=300 must exceed --sink + --recent"),
    ({"dtype": "int8"}, "--dtype='int8' is invalid"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_settings_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(DuoConfigError) as info:
        _config(tmp_path, **overrides)
    assert message in str(info.value)


def test_defaults_reach_the_context_and_spread_depths(tmp_path):
    assert default_lengths(8192, 16) == (1024, 2048, 3072, 4096, 5120, 6144, 7168, 8176)
    assert default_lengths(2048, 16) == (1024, 2032)
    assert default_depths(10)[:2] == (0.05, 0.15) and default_depths(10)[-1] == 0.95
    assert len(default_depths(10)) == 10
    config = _config(tmp_path, sparsities=(0.25, 0.75), sparsity=0.5)
    assert config.sweep_points == (0.25, 0.5, 0.75)
    assert _config(tmp_path, parts=("sweep",), sparsities=(0.9,)).sweep_points == (0.9,)


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODEL_DIR" in err[0] and "does not exist" in err[0]


def test_cli_bad_flag_values_name_the_flag(capsys, tiny_gqa, tmp_path):
    from conftest import write_pattern

    pattern = write_pattern(tmp_path / "pattern", [[0.5, 0.2]] * 4)
    cases = [
        (["--sparsity", "half"], "--sparsity=half: 'half' is not a number"),
        (["--lengths", "1K,two"], "'two' is not a token count"),
        (["--methods", "full,duo,magic"], "'magic' is not one of"),
        (["--depths", "0"], "--depths=0: expected a count in [1, 100]"),
    ]
    for extra, needle in cases:
        assert main(["eval", str(tiny_gqa), "--pattern", str(pattern), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (extra, err)
    assert main(["eval", str(tiny_gqa), "--pattern", str(tmp_path / "none")]) == 2
    assert "--pattern" in capsys.readouterr().err
    wrong = write_pattern(tmp_path / "wrong", [[0.5, 0.2, 0.1]] * 4)
    assert main(["eval", str(tiny_gqa), "--pattern", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "--pattern" in err and "has shape 4x3" in err and "the model has 4x2" in err


def test_token_agreement_against_direct_sums():
    rng = np.random.default_rng(0)
    import torch

    head = torch.tensor(rng.normal(size=(11, 4)), dtype=torch.float32)
    ref = rng.normal(size=(7, 4)).astype(np.float32)
    test = ref.copy()
    test[3:] += rng.normal(size=(4, 4)).astype(np.float32)
    kl, agree = token_agreement(ref, test, head, chunk=3)
    for p in range(7):
        lp = torch.log_softmax(torch.tensor(ref[p]) @ head.T, -1).double().numpy()
        lq = torch.log_softmax(torch.tensor(test[p]) @ head.T, -1).double().numpy()
        assert kl[p] == pytest.approx(float((np.exp(lp) * (lp - lq)).sum()), abs=1e-5)
        assert agree[p] == (lp.argmax() == lq.argmax())
    assert (kl[:3] < 1e-9).all() and agree[:3].all()


def test_bins_and_summaries():
    assert position_bins([1024, 2048, 512], 320) == [(320, 512), (512, 1024), (1024, 2048)]
    assert position_bins([100, 400], 320) == [(320, 400)]
    kl = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 2.0, 1.0]])
    agree = np.array([[True, False, True, True], [True, True, False, True]])
    (row,) = summarise(kl, agree, [(1, 3)])
    assert row["positions"] == 4 and row["kl_mean"] == pytest.approx(2.0)
    assert row["top1"] == pytest.approx(0.5)
    assert summarise(kl, agree, [(9, 12)]) == []


def _results(tmp_path, rows, **settings):
    from conftest import write_pattern

    pattern = write_pattern(tmp_path / "pattern", [[0.9, 0.1], [0.8, 0.2]])
    base = {"sparsity": 0.5, "methods": ["full", "duo", "streaming", "random"],
            "lengths": [1024, 2048, 4096], "depths": [0.25, 0.75], "families": ["heldout"],
            "parts": ["niah"], "per_cell": 1, "sink": 64, "recent": 256}  # fmt: skip
    meta = {"settings": {**base, **settings}, "pattern": str(pattern), "baseline": None}
    return {"meta": meta, "answers": rows, "agreement": {}}


def _rows(method, sparsity, correct_by_length):
    return [
        {"family": "heldout", "method": method, "sparsity": sparsity, "length": n, "depth": d,
         "correct": ok}
        for n, oks in correct_by_length.items()
        for d, ok in zip((0.25, 0.75), oks)
    ]  # fmt: skip


def test_report_finds_the_working_range_and_checks_the_targets(tmp_path):
    rows = (
        _rows("full", None, {1024: [1, 1], 2048: [1, 1], 4096: [0, 1]})
        + _rows("duo", 0.5, {1024: [1, 1], 2048: [1, 0], 4096: [0, 0]})
        + _rows("streaming", 1.0, {1024: [0, 0], 2048: [0, 0], 4096: [0, 0]})
        + _rows("random", 0.5, {1024: [1, 0], 2048: [1, 0], 4096: [0, 0]})
    )
    results = _results(tmp_path, rows)
    shape = {"num_layers": 2, "num_kv_heads": 2, "head_size": 64}
    summary = report.analyse(results, shape)
    fam = summary["families"]["heldout"]
    assert fam["working_range"] == [1024, 2048]  # 4096 has full attention at 50%
    assert fam["in_range"] == {"full": 1.0, "duo": 0.75, "streaming": 0.0, "random": 0.5}
    assert fam["duo_over_full"] == 0.75 and fam["duo_target_met"] is False
    assert fam["streaming_clearly_below"] is True and fam["random_clearly_below"] is True
    assert fam["niah"]["duo"]["grid"] == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    text = "\n".join(report.table(results, summary))
    assert "up to 2K" in text and "DUO / full = 0.750" in text and "MISSED" in text
    assert report.working_range({1024: 0.5, 2048: 1.0}) == []


def test_kv_bytes_per_token_follow_the_head_split(tmp_path):
    from conftest import write_pattern

    pattern = write_pattern(tmp_path / "p", [[0.9, 0.1], [0.8, 0.2]])
    shape = {"num_layers": 2, "num_kv_heads": 2, "head_size": 64}
    full = 2 * 2 * 2 * 64 * 2
    assert report.kv_bytes_per_token(pattern, 0.0, 4096, 64, 256, shape) == full
    # Half the heads keep 320 of 4096 tokens.
    want = full * (0.5 + 0.5 * 320 / 4096)
    assert report.kv_bytes_per_token(pattern, 0.5, 4096, 64, 256, shape) == pytest.approx(want)


@pytest.mark.slow
def test_small_real_run_writes_table_json_and_plots(tmp_path, capsys, monkeypatch, tiny_gqa):
    """Full, DUO and all-streaming in real vLLM on the tiny model (random weights, so the
    answers are wrong); checks the files, the table and that agreement sees DUO differ from
    full attention only beyond S + W."""
    from conftest import write_pattern

    monkeypatch.setenv("VLLM_CACHE_ROOT", os.environ.get("VLLM_CACHE_ROOT", str(tmp_path / "c")))
    pattern = write_pattern(tmp_path / "pattern", [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    out = tmp_path / "eval"
    argv = ["eval", str(tiny_gqa), "--pattern", str(pattern), "--methods", "full,duo,streaming",
            "--lengths", "300,600", "--depths", "2", "--sparsities", "0.5", "--sink", "4",
            "--recent", "16", "--agreement-length", "400", "--agreement-windows", "1",
            "--dtype", "float32", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "== heldout family: newton-opticks text, 7-digit keys ==" in printed
    assert "streaming @1" in printed and "agreement with full attention" in printed
    data = json.loads((out / "eval.json").read_text())
    answers = data["answers"]
    # 2 lengths x 2 depths per method (the sweep's cases are a subset of the heat map's).
    assert sorted({(a["method"], a["sparsity"]) for a in answers}) == [
        ("duo", 0.5), ("full", None), ("streaming", 1.0)]  # fmt: skip
    assert len(answers) == 12 and all(isinstance(a["answer"], str) for a in answers)
    agreement = data["summary"]["agreement"]
    assert agreement["duo"]["within_sink_and_window"]["kl_mean"] < 1e-3
    assert agreement["streaming"]["bins"][-1]["kl_mean"] > 1e-3
    assert agreement["streaming"]["bins"][-1]["to"] == 400
    for name in ("niah-heldout.png", "sweep.png", "agreement.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert data["meta"]["command"].startswith("vllm-duo eval")
    assert len([j for j in data["meta"]["jobs"]]) == 6  # one process per method and mode


def test_a_finished_job_is_reused_only_when_identical_and_complete(tmp_path):
    from vllm_duo.evaluation.run import Job, _finished

    job = Job("full", None, "generate", cases=[object(), object()])  # type: ignore[list-item]
    request, results = tmp_path / "r.json", tmp_path / "r.jsonl"
    assert _finished(request, results, "{}", job) is None
    request.write_text("{}")
    rows = [{"kind": "engine", "startup_s": 1.5}, {"kind": "answer", "i": 0, "text": "1"}]
    results.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _finished(request, results, "{}", job) is None  # one answer missing
    with results.open("a") as f:
        f.write(json.dumps({"kind": "answer", "i": 1, "text": "2"}) + "\n")
    reused = _finished(request, results, "{}", job)
    assert reused is not None and [r["i"] for r in reused["rows"]] == [0, 1]
    assert _finished(request, results, '{"other": 1}', job) is None  # different request


def test_a_killed_job_resumes_where_it_stopped(tmp_path):
    """A rerun of the same request answers only the prompts without a line: a torn last line
    and a hidden-state row whose file is gone are dropped (and so run again), never doubled."""
    from vllm_duo.evaluation.worker import answered
    from vllm_duo.worker_process import read_rows

    results = tmp_path / "r.jsonl"
    assert answered(str(results), "generate") == set()
    rows = [{"kind": "engine", "startup_s": 1.0}, {"kind": "answer", "i": 0, "text": "1"},
            {"kind": "answer", "i": 2, "text": "3"}]  # fmt: skip
    results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "ans')
    assert [r.get("i") for r in read_rows(results)] == [None, 0, 2]  # the torn line is left out
    assert answered(str(results), "generate") == {0, 2}
    assert results.read_text().endswith("}\n")  # rewritten without the torn line
    kept = tmp_path / "kept.npy"
    kept.write_bytes(b"x")
    hidden = [{"kind": "hidden", "i": 0, "path": str(kept)},
              {"kind": "hidden", "i": 1, "path": str(tmp_path / "gone.npy")}]  # fmt: skip
    results.write_text("".join(json.dumps(r) + "\n" for r in hidden))
    assert answered(str(results), "hidden") == {0}
    assert [r["i"] for r in read_rows(results)] == [0]


def test_a_job_with_other_gates_or_settings_is_not_reused(tmp_path):
    """The reuse key covers what the worker gets through the environment: DUO's settings and
    the gates themselves (a pattern rewritten in place must not reuse old answers)."""
    from vllm_duo.evaluation.run import Job, _duo_settings, _pattern_digest

    pattern = tmp_path / "p"
    pattern.mkdir()
    (pattern / "full_attention_heads.tsv").write_text("1\t0\n0\t1\n")
    job, full = Job("duo", 0.5, "generate"), Job("full", None, "generate")
    config = types.SimpleNamespace(sink=64, recent=256)
    before = (_duo_settings(job, {"duo": pattern}, config), _pattern_digest(job, {"duo": pattern}))
    (pattern / "full_attention_heads.tsv").write_text("1\t1\n0\t1\n")
    after = (_duo_settings(job, {"duo": pattern}, config), _pattern_digest(job, {"duo": pattern}))
    assert before[0] == after[0] and before[1] != after[1]
    config.recent = 128
    assert _duo_settings(job, {"duo": pattern}, config) != after[0]
    assert _duo_settings(full, {}, config) == {} and _pattern_digest(full, {}) is None
