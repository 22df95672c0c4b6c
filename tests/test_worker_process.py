"""The child-process runner shared by vllm-duo bench and eval (no engine needed)."""

from __future__ import annotations

import json
import os

import pytest

from vllm_duo.worker_process import read_rows, run_worker


def test_runs_the_module_polls_and_cleans_its_temp_dir(tmp_path):
    source, target = tmp_path / "in.json", tmp_path / "out.json"
    source.write_text(json.dumps({"kind": "engine"}))
    polls, temps = [], []

    def env_for(tmp):
        temps.append(tmp)
        assert tmp.is_dir()
        return {**os.environ, "TMPDIR": str(tmp)}

    run_worker("json.tool", ["--compact", str(source), str(target)], log_path=tmp_path / "log",
               env_for=env_for, on_poll=lambda: polls.append(1), what="test worker")  # fmt: skip
    assert read_rows(target) == [{"kind": "engine"}]
    assert polls, "on_poll is called at least once, at the end"
    assert not temps[0].exists()


def test_a_failing_child_is_one_error_naming_it_with_its_log_tail(tmp_path):
    want = r"(?s)the test worker failed \(exit 1\); log .*No module"
    with pytest.raises(RuntimeError, match=want):
        run_worker("vllm_duo_no_such_module", [], log_path=tmp_path / "logs" / "w.log",
                   env_for=lambda tmp: dict(os.environ), on_poll=lambda: None,
                   what="test worker")  # fmt: skip


def test_read_rows_of_a_file_not_written_yet(tmp_path):
    assert read_rows(tmp_path / "missing.jsonl") == []
