"""Tests of the ``vllm-duo`` command line (``vllm_duo.cli``), run in-process with capsys.

Expected numbers are worked out by hand from the pattern files (or from small patterns written
here), not by calling the library the CLI is built on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_duo import __version__
from vllm_duo.cli import main

BUNDLED_GQA = "Llama-3-8B-Instruct-Gradient-1048k"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_tsv(directory: Path, rows: list[list[float]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(str(v) for v in row) + "\n" for row in rows)
    (directory / "full_attention_heads.tsv").write_text(text)
    return directory


@pytest.fixture()
def small_pattern(tmp_path: Path) -> Path:
    """3 layers x 4 KV heads with distinct gates; sorted descending: 0.95 (l1h3), 0.9 (l0h0), ..."""
    return _write_tsv(
        tmp_path / "small",
        [
            [0.9, 0.1, 0.2, 0.3],
            [0.05, 0.6, 0.7, 0.95],
            [0.4, 0.8, 0.0, 0.5],
        ],
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vllm-duo: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------
# patterns list
# --------------------------------------------------------------------------------------------


def test_list_shows_every_bundled_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "patterns", "list")
    assert code == 0 and err == ""
    header = out.splitlines()[0]
    for column in ("NAME", "MODEL IDS", "LAYERS x KV", "HEADS", "HEAD SIZE", "SPARSITY"):
        assert column in header
    table = out.split("\n\n")[0].splitlines()[1:]  # the table ends at the first blank line
    rows = {line.split()[0]: line for line in table if line[0] != " "}
    assert re.search(
        r"gradientai/Llama-3-8B-Instruct-Gradient-1048k\s+32 x 8\s+32\s+128\s+0\.5$",
        rows[BUNDLED_GQA],
    )
    assert re.search(r"32 x 32\s+32\s+128\s+0\.5$", rows["Llama-2-7B-32K-Instruct"])
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" in rows["Mixtral-8x7B-Instruct-v0.1"]
    # The second model id of Llama 3.1 is listed too (on a continuation row).
    assert "meta-llama/Llama-3.1-8B-Instruct" in out
    assert len(rows) == 8
    assert re.search(r"30 x 3\s+9\s+64\s+0\.5$", rows["SmolLM2-135M-Instruct"])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"vllm-duo {__version__}"


# --------------------------------------------------------------------------------------------
# patterns show
# --------------------------------------------------------------------------------------------


def test_show_bundled_name_is_case_insensitive(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "patterns", "show", BUNDLED_GQA.lower())
    assert code == 0 and err == ""
    assert f"bundled:{BUNDLED_GQA}" in out
    assert "32 layers x 8 KV heads, 32 attention heads, head size 128" in out
    # No flag: the bundled pattern's recommended sparsity (0.5) is used.
    assert "sparsity=0.5 (recommended for this pattern)" in out
    assert "128/256 heads (50.0%)" in out
    layer_rows = [line for line in out.splitlines() if line.startswith("layer ")]
    assert len(layer_rows) == 32
    for row in layer_rows:
        match = re.fullmatch(r"layer +(\d+): (\d)/8 retrieval  heads \[([0-9, ]*)\]", row)
        assert match, row
        heads = [int(h) for h in match[3].split(", ")] if match[3] else []
        assert len(heads) == int(match[2])
        assert heads == sorted(set(heads)) and all(0 <= h < 8 for h in heads)
    assert sum(int(row.split(":")[1].split("/")[0]) for row in layer_rows) == 128
    # r = 0.5, S + W = 320, L = 8192: ratio 0.5 + 0.5 * 320 / 8192 = 0.51953...
    # full attention: 2 * 32 * 8 * 128 * 2 bytes = 128 KiB per token; DUO 66.5 KiB.
    assert "66.5 KiB vs 128.0 KiB for full attention (52.0% of full attention)" in out
    assert "reduction at L=8192: 1.92x" in out


def test_show_path_with_sparsity_and_window(
    capsys: pytest.CaptureFixture[str], small_pattern: Path
) -> None:
    code, out, err = _run(
        capsys,
        "patterns",
        "show",
        str(small_pattern),
        "--sparsity",
        "0.75",
        "--sink",
        "4",
        "--recent",
        "12",
        "--context",
        "64",
    )
    assert code == 0 and err == ""
    assert str(small_pattern) in out
    assert "3 layers x 4 KV heads" in out
    assert "sparsity=0.75 (--sparsity)" in out
    # 12 heads, round(0.75 * 12) = 9 streaming: retrieval = top 3 gates 0.95, 0.9, 0.8.
    assert "3/12 heads (25.0%)" in out
    assert "layer 0: 1/4 retrieval  heads [0]" in out
    assert "layer 1: 1/4 retrieval  heads [3]" in out
    assert "layer 2: 1/4 retrieval  heads [1]" in out
    # ratio = 0.25 + 0.75 * 16 / 64 = 0.4375 -> 43.8%, reduction 1 / 0.4375 = 2.29x.
    assert "43.8% of full attention" in out
    assert "reduction at L=64: 2.29x" in out


def test_show_default_sparsity_for_a_path(
    capsys: pytest.CaptureFixture[str], small_pattern: Path
) -> None:
    tsv = small_pattern / "full_attention_heads.tsv"
    code, out, _ = _run(capsys, "patterns", "show", str(tsv))
    assert code == 0
    assert "sparsity=0.5 (default)" in out
    # Top 6 gates: 0.95 (1,3), 0.9 (0,0), 0.8 (2,1), 0.7 (1,2), 0.6 (1,1), 0.5 (2,3).
    assert "layer 0: 1/4 retrieval  heads [0]" in out
    assert "layer 1: 3/4 retrieval  heads [1, 2, 3]" in out
    assert "layer 2: 2/4 retrieval  heads [1, 3]" in out


def test_show_threshold(capsys: pytest.CaptureFixture[str], small_pattern: Path) -> None:
    code, out, _ = _run(capsys, "patterns", "show", str(small_pattern), "--threshold=0.7")
    assert code == 0
    assert "threshold=0.7 (--threshold)" in out
    # gates >= 0.7: 0.9 (0,0), 0.7 and 0.95 (1,2 and 1,3), 0.8 (2,1).
    assert "4/12 heads (33.3%)" in out
    assert "layer 0: 1/4 retrieval  heads [0]" in out
    assert "layer 1: 2/4 retrieval  heads [2, 3]" in out
    assert "layer 2: 1/4 retrieval  heads [1]" in out


def test_show_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "pattern.png"
    code, out, err = _run(
        capsys, "patterns", "show", BUNDLED_GQA, "--sparsity", "0.5", "--png", str(png)
    )
    assert code == 0, err
    assert f"heat map written to {png}" in out
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10 * 1024


# --------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2
# --------------------------------------------------------------------------------------------


def test_unknown_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    line = _assert_error(capsys, ["patterns", "show", "no-such-pattern"], "'no-such-pattern'")
    assert BUNDLED_GQA in line  # the message lists what exists
    assert "VLLM_DUO_PATTERN" not in line


def test_malformed_pattern_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\t0.2\n0.3\n")
    _assert_error(capsys, ["patterns", "show", str(bad)], str(bad), "row 2")


def test_directory_without_gates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _assert_error(capsys, ["patterns", "show", str(tmp_path)], "full_attention_heads.tsv")


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        ("--sparsity=1.5", "--sparsity=1.5 is out of range"),
        ("--sparsity=abc", "--sparsity=abc is not a number"),
        ("--threshold=-0.1", "--threshold=-0.1 is out of range"),
        ("--threshold=nan", "--threshold=nan is not a finite number"),
        ("--sink=-1", "--sink=-1 is not a base-10 integer"),
        ("--recent=0", "--recent=0 is out of range"),
        ("--context=0", "--context=0 is out of range"),
        ("--context=8k", "--context=8k is not a base-10 integer"),
        ("--sparsity=", "--sparsity='' is empty"),
    ],
)
def test_bad_flag_values(capsys: pytest.CaptureFixture[str], flag: str, needle: str) -> None:
    line = _assert_error(capsys, ["patterns", "show", BUNDLED_GQA, flag], needle)
    assert "VLLM_DUO_" not in line


def test_sparsity_and_threshold_together(capsys: pytest.CaptureFixture[str]) -> None:
    _assert_error(
        capsys,
        ["patterns", "show", BUNDLED_GQA, "--sparsity", "0.5", "--threshold", "0.5"],
        "--threshold",
        "--sparsity",
    )


def test_png_in_missing_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "missing" / "x.png"
    _assert_error(capsys, ["patterns", "show", BUNDLED_GQA, "--png", str(target)], str(target))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "required"),
        (["patterns"], "required"),
        (["patterns", "frob"], "'frob'"),
        (["bogus"], "'bogus'"),
        (["patterns", "list", "--nope"], "--nope"),
        (["patterns", "show"], "required"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    _assert_error(capsys, argv, needle)


# --------------------------------------------------------------------------------------------
# Installed console script; no vLLM import
# --------------------------------------------------------------------------------------------


def test_console_script_and_no_vllm_import(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / ("vllm-duo.exe" if os.name == "nt" else "vllm-duo")
    assert script.is_file(), f"console script not installed at {script}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
    listed = subprocess.run(
        [str(script), "patterns", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr
    assert BUNDLED_GQA in listed.stdout

    bad = subprocess.run(
        [str(script), "patterns", "show", BUNDLED_GQA, "--sparsity=1.5"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "--sparsity=1.5" in bad.stderr

    # Importing the CLI, and running the pure pattern commands, must leave vLLM unloaded.
    code = (
        "import sys, vllm_duo.cli\n"
        "assert 'vllm' not in sys.modules, 'import vllm_duo.cli imported vllm'\n"
        "rc = vllm_duo.cli.main(['patterns', 'show', sys.argv[1]])\n"
        "assert rc == 0, rc\n"
        "assert 'vllm' not in sys.modules, 'patterns show imported vllm'\n"
    )
    checked = subprocess.run(
        [sys.executable, "-c", code, BUNDLED_GQA],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert checked.returncode == 0, checked.stderr
