"""Tests of vllm_duo.patterns: loading, head selection, HeadPlan and bundled patterns.

``tests/data/bundled_pattern_counts.json`` is produced by an implementation written here, apart
from the library (csv parsing + a plain sort), so the library is checked against it rather than
against itself. Regenerate it only when a bundled pattern is added or changed on purpose:

    PYTHONPATH=. .venv/bin/python tests/test_patterns.py --regenerate-counts
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vllm_duo import patterns
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import (
    GATES_FILE,
    MAX_PATTERN_BYTES,
    BundledPattern,
    HeadPlan,
    bundled_patterns_dir,
    check_shape,
    list_bundled,
    load_gates,
    resolve_pattern,
    select_retrieval,
)

REPO = Path(__file__).resolve().parent.parent
COUNTS_FILE = Path(__file__).resolve().parent / "data" / "bundled_pattern_counts.json"
PURE_MODULES = ("errors.py", "settings.py", "patterns.py")
UPSTREAM_BUNDLED = {
    "Llama-2-7B-32K-Instruct",
    "Llama-3-8B-Instruct-Gradient-1048k",
    "Llama-3-8B-Instruct-Gradient-4194k",
    "Meta-Llama-3.1-8B-Instruct",
    "Mistral-7B-Instruct-v0.2",
    "Mistral-7B-Instruct-v0.3",
    "Mixtral-8x7B-Instruct-v0.1",
}
# Made with `vllm-duo calibrate` (see patterns/README.md).
CALIBRATED_BUNDLED = {"SmolLM2-135M-Instruct"}
EXPECTED_BUNDLED = UPSTREAM_BUNDLED | CALIBRATED_BUNDLED


# --------------------------------------------------------------------------------------------
# Independent reference (deliberately naive; shares no code with the library)
# --------------------------------------------------------------------------------------------


def reference_clip(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def reference_select(rows: list[list[float]], sparsity: float) -> set[tuple[int, int]]:
    """Top N - round(s*N) heads by (-clipped gate, layer-major flat index)."""
    width = len(rows[0])
    flat = [reference_clip(v) for row in rows for v in row]
    n = len(flat)
    keep = n - round(sparsity * n)
    ranked = sorted(range(n), key=lambda i: (-flat[i], i))
    return {(i // width, i % width) for i in ranked[:keep]}


def reference_read_tsv(path: Path) -> list[list[float]]:
    with path.open(newline="") as handle:
        return [
            [float(cell) for cell in row if cell.strip()]
            for row in csv.reader(handle, delimiter="\t")
            if row
        ]


def mask_to_set(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in np.argwhere(mask)}


def reference_counts() -> dict[str, object]:
    """Per-layer retrieval counts of every bundled pattern at its recommended sparsity."""
    result: dict[str, object] = {}
    for directory in sorted(p for p in (REPO / "patterns").iterdir() if p.is_dir()):
        meta = json.loads((directory / "model.json").read_text())
        rows = reference_read_tsv(directory / GATES_FILE)
        sparsity = meta["recommended_sparsity"]
        chosen = reference_select(rows, sparsity)
        per_layer = [
            sum(1 for h in range(len(rows[0])) if (layer, h) in chosen)
            for layer in range(len(rows))
        ]
        result[directory.name] = {
            "shape": [len(rows), len(rows[0])],
            "sparsity": sparsity,
            "num_retrieval": len(chosen),
            "retrieval_per_layer": per_layer,
            "sha256": {
                name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
                for name in (GATES_FILE, "config.json")
            },
        }
    return result


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def write_tsv(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def tsv_text(matrix: np.ndarray) -> str:
    return "".join("\t".join(repr(float(v)) for v in row) + "\n" for row in matrix)


TIE_VALUES = [-1.0, -1e-3, 0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.0 + 1e-3, 2.0]
gate_matrices = arrays(
    np.float64,
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    elements=st.one_of(
        st.sampled_from(TIE_VALUES),
        st.floats(-0.2, 1.2, allow_nan=False, allow_infinity=False),
    ),
)
sparsities = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)


# --------------------------------------------------------------------------------------------
# Purity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_modules_do_not_import_vllm(module: str) -> None:
    tree = ast.parse((REPO / "vllm_duo" / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] != "vllm", f"{module} imports {name}"


def test_importing_pure_modules_leaves_vllm_unloaded() -> None:
    code = (
        "import sys, vllm_duo.patterns, vllm_duo.settings, vllm_duo.errors; "
        "sys.exit(1 if 'vllm' in sys.modules else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# load_gates
# --------------------------------------------------------------------------------------------


def test_load_directory_and_file(tmp_path: Path) -> None:
    write_tsv(tmp_path / GATES_FILE, "0.5\t1.0\n0.25\t0.0\n")
    from_dir = load_gates(tmp_path)
    from_file = load_gates(str(tmp_path / GATES_FILE))
    assert from_dir.dtype == np.float64
    assert from_dir.shape == (2, 2)
    np.testing.assert_array_equal(from_dir, [[0.5, 1.0], [0.25, 0.0]])
    np.testing.assert_array_equal(from_dir, from_file)
    assert from_dir is not from_file


def test_load_clips_and_is_read_only(tmp_path: Path) -> None:
    write_tsv(tmp_path / GATES_FILE, "-1.0e-3\t1.5\n2e-1\t-7\n")
    gates = load_gates(tmp_path)
    np.testing.assert_array_equal(gates, [[0.0, 1.0], [0.2, 0.0]])
    assert not gates.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        gates[0, 0] = 0.5


def test_load_tolerates_trailing_whitespace_blank_tail_crlf_and_bom(tmp_path: Path) -> None:
    text = "\ufeff0.1\t0.2\t\r\n0.3\t0.4  \r\n\n  \n\n"
    gates = load_gates(write_tsv(tmp_path / "x.tsv", text))
    np.testing.assert_array_equal(gates, [[0.1, 0.2], [0.3, 0.4]])


@settings(max_examples=60, deadline=None)
@given(
    matrix=arrays(
        np.float64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.floats(-3, 3)
    )
)
def test_load_roundtrip_equals_clipped_values(
    tmp_path_factory: pytest.TempPathFactory, matrix: np.ndarray
) -> None:
    path = write_tsv(tmp_path_factory.mktemp("rt") / GATES_FILE, tsv_text(matrix))
    gates = load_gates(path)
    assert gates.shape == matrix.shape
    assert ((gates >= 0.0) & (gates <= 1.0)).all()
    np.testing.assert_array_equal(gates, np.clip(matrix, 0.0, 1.0))


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("0.1\t0.2\t0.3\n0.4\t0.5\t0.6\n0.7\t0.8\n", ["row 3", "2 columns", "row 1 has 3"]),
        ("0.1\t0.2\n0.4\t0.5\t0.6\n", ["row 2", "3 columns", "row 1 has 2"]),
        ("0.1\t0.2\n0.3\tabc\n", ["row 2 column 2", "'abc'", "not a number"]),
        ("0.1\t\t0.2\n", ["row 1 column 2", "''"]),
        ("0.1 0.2\n", ["row 1 column 1", "tabs"]),
        ("0.1\tnan\n", ["row 1 column 2", "'nan'", "not finite"]),
        ("0.1\t0.2\ninf\t0.2\n", ["row 2 column 1", "'inf'", "not finite"]),
        ("-inf\n", ["row 1 column 1", "not finite"]),
        ("", ["empty"]),
        ("\n \n\t\n", ["empty"]),
        ("0.1\n\n0.2\n", ["row 2 is blank"]),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write_tsv(tmp_path / GATES_FILE, text)
    with pytest.raises(DuoConfigError) as info:
        load_gates(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / GATES_FILE).write_bytes(b"0.1\t\xff\xfe\n")
    with pytest.raises(DuoConfigError, match="not UTF-8"):
        load_gates(tmp_path)


def test_huge_file_is_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / GATES_FILE
    with path.open("wb") as handle:
        handle.truncate(MAX_PATTERN_BYTES + 1)  # sparse: costs no disk space

    def no_read(self: Path) -> bytes:
        raise AssertionError("the file must not be read")

    monkeypatch.setattr(Path, "read_bytes", no_read)
    with pytest.raises(DuoConfigError) as info:
        load_gates(path)
    assert str(MAX_PATTERN_BYTES + 1) in str(info.value)
    assert "16 MiB" in str(info.value)


def test_missing_path_and_directory_without_tsv(tmp_path: Path) -> None:
    with pytest.raises(DuoConfigError, match="does not exist") as info:
        load_gates(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(DuoConfigError, match=f"has no {GATES_FILE}"):
        load_gates(tmp_path)


# --------------------------------------------------------------------------------------------
# select_retrieval
# --------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(matrix=gate_matrices, sparsity=sparsities)
def test_sparsity_matches_reference(matrix: np.ndarray, sparsity: float) -> None:
    before = matrix.copy()
    mask = select_retrieval(matrix, sparsity=sparsity)
    n = matrix.size
    assert mask.dtype == np.bool_
    assert mask.shape == matrix.shape
    assert int(mask.sum()) == n - round(sparsity * n)
    assert mask_to_set(mask) == reference_select(matrix.tolist(), sparsity)
    np.testing.assert_array_equal(matrix, before)  # input not mutated
    np.testing.assert_array_equal(select_retrieval(matrix, sparsity=sparsity), mask)


@settings(max_examples=150, deadline=None)
@given(matrix=gate_matrices, data=st.data())
def test_threshold_agrees_with_sparsity_at_untied_kth_value(
    matrix: np.ndarray, data: st.DataObject
) -> None:
    clipped = [reference_clip(v) for v in matrix.ravel().tolist()]
    n = len(clipped)
    ranked = sorted(clipped, reverse=True)
    untied = [k for k in range(1, n + 1) if clipped.count(ranked[k - 1]) == 1]
    if not untied:
        return
    k = data.draw(st.sampled_from(untied))
    sparsity = (n - k) / n
    assert n - round(sparsity * n) == k
    by_threshold = select_retrieval(matrix, threshold=ranked[k - 1])
    by_sparsity = select_retrieval(matrix, sparsity=sparsity)
    np.testing.assert_array_equal(by_threshold, by_sparsity)


@settings(max_examples=100, deadline=None)
@given(matrix=gate_matrices, t=st.floats(0.0, 1.0))
def test_threshold_matches_definition(matrix: np.ndarray, t: float) -> None:
    mask = select_retrieval(matrix, threshold=t)
    expected = {
        (i, j)
        for i, row in enumerate(matrix.tolist())
        for j, v in enumerate(row)
        if reference_clip(v) >= t
    }
    assert mask_to_set(mask) == expected


@settings(max_examples=100, deadline=None)
@given(matrix=gate_matrices, a=sparsities, b=sparsities)
def test_selection_is_nested_in_sparsity(matrix: np.ndarray, a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    more = select_retrieval(matrix, sparsity=low)
    fewer = select_retrieval(matrix, sparsity=high)
    assert not (fewer & ~more).any()


def test_bankers_rounding_and_tie_order() -> None:
    # N=5, s=0.5: round(2.5) = 2 streaming -> 3 retrieval.
    assert select_retrieval(np.ones((1, 5)), sparsity=0.5).sum() == 3
    # N=3, s=0.5: round(1.5) = 2 streaming -> 1 retrieval.
    assert select_retrieval(np.ones((3, 1)), sparsity=0.5).sum() == 1
    # N=1, s=0.5: round(0.5) = 0 streaming -> the single head stays retrieval.
    assert select_retrieval(np.ones((1, 1)), sparsity=0.5).sum() == 1
    # Ties (including 1.7 and 1.0, both clipped to 1) go to the lowest flat index.
    gates = np.array([[0.2, 1.0, 0.9], [1.7, 1.0, 0.0]])
    np.testing.assert_array_equal(
        select_retrieval(gates, sparsity=0.5), [[False, True, False], [True, True, False]]
    )
    np.testing.assert_array_equal(
        select_retrieval(gates, sparsity=4 / 6), [[False, True, False], [True, False, False]]
    )


def test_selection_is_global_not_per_layer() -> None:
    gates = np.array([[0.9, 0.8], [0.1, 0.2]])
    np.testing.assert_array_equal(
        select_retrieval(gates, sparsity=0.5), [[True, True], [False, False]]
    )


def test_extreme_sparsities_and_read_only_input() -> None:
    gates = np.linspace(0, 1, 12).reshape(3, 4)
    gates.setflags(write=False)
    assert select_retrieval(gates, sparsity=0.0).all()
    assert not select_retrieval(gates, sparsity=1.0).any()
    assert select_retrieval(gates, threshold=0.0).all()
    assert select_retrieval(gates.tolist(), threshold=1.0).sum() == 1


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "exactly one"),
        ({"sparsity": 0.5, "threshold": 0.5}, "exactly one"),
        ({"sparsity": 1.5}, "sparsity=1.5"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"sparsity": float("nan")}, "sparsity=nan"),
        ({"threshold": 2}, "threshold=2"),
        ({"threshold": True}, "threshold=True"),
        ({"sparsity": "0.5"}, "sparsity='0.5'"),
    ],
)
def test_select_bad_arguments(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(DuoConfigError) as info:
        select_retrieval(np.ones((2, 2)), **kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("gates", "fragment"),
    [
        (np.ones(4), "2-D"),
        (np.ones((0, 3)), "2-D"),
        (np.array([[0.5, np.nan]]), "layer 0, KV head 1"),
    ],
)
def test_select_bad_gates(gates: np.ndarray, fragment: str) -> None:
    with pytest.raises(DuoConfigError, match=fragment):
        select_retrieval(gates, sparsity=0.5)


# --------------------------------------------------------------------------------------------
# HeadPlan and check_shape
# --------------------------------------------------------------------------------------------


def test_head_plan_from_mask() -> None:
    mask = np.array([[True, False, True, False], [False, False, False, False], [True] * 4])
    plan = HeadPlan.from_mask(mask)
    assert plan.retrieval == ((0, 2), (), (0, 1, 2, 3))
    assert plan.streaming == ((1, 3), (0, 1, 2, 3), ())
    assert (plan.num_layers, plan.num_kv_heads) == (3, 4)
    assert (plan.num_retrieval, plan.num_streaming) == (6, 6)
    assert plan.retrieval_fraction == 0.5
    assert plan.counts_per_layer() == (2, 0, 4)
    np.testing.assert_array_equal(plan.to_mask(), mask)
    assert "6/12" in plan.summary()
    assert "\n" not in plan.summary()


@settings(max_examples=50, deadline=None)
@given(mask=arrays(np.bool_, st.tuples(st.integers(1, 8), st.integers(1, 8))))
def test_head_plan_roundtrip(mask: np.ndarray) -> None:
    plan = HeadPlan.from_mask(mask)
    np.testing.assert_array_equal(plan.to_mask(), mask)
    assert plan.num_retrieval == int(mask.sum())
    assert plan.num_retrieval + plan.num_streaming == mask.size


def test_kv_bytes_ratio() -> None:
    plan = HeadPlan.from_mask(np.array([[True, False], [False, True]]))
    assert plan.kv_bytes_ratio(1024, 64, 256) == pytest.approx((2 + 2 * 320 / 1024) / 4)
    assert plan.kv_bytes_ratio(100, 64, 256) == 1.0  # window covers the whole context
    assert plan.kv_bytes_ratio(321, 0, 320) == pytest.approx((2 + 2 * 320 / 321) / 4)
    full = HeadPlan.from_mask(np.ones((2, 3), dtype=bool))
    assert full.kv_bytes_ratio(10**6, 64, 256) == 1.0
    none = HeadPlan.from_mask(np.zeros((2, 3), dtype=bool))
    assert none.kv_bytes_ratio(3200, 64, 256) == pytest.approx(0.1)
    for args in [(0, 64, 256), (10, -1, 256), (10, 0, 0), (10.5, 1, 1)]:
        with pytest.raises(DuoConfigError):
            plan.kv_bytes_ratio(*args)  # type: ignore[arg-type]


def test_compact_counts() -> None:
    def plan_of(counts: list[int], width: int = 8) -> HeadPlan:
        return HeadPlan.from_mask(np.array([[h < c for h in range(width)] for c in counts]))

    assert plan_of([1, 3, 8, 8, 8, 2]).compact_counts() == "1,3,8x3,2"
    assert plan_of([4, 4, 3, 8]).compact_counts() == "4,4,3,8"
    assert plan_of([0] * 5).compact_counts() == "0x5"
    assert plan_of([7]).compact_counts() == "7"


@pytest.mark.parametrize(
    ("retrieval", "streaming"),
    [
        ((), ()),
        (((0,),), ((0,),)),
        (((0,),), ((2,),)),
        (((1, 0),), ((),)),
        (((0,), (0,)), ((1,),)),
        (((0,), (0, 1, 2)), ((1,), ())),
        (((True,),), ((),)),
    ],
)
def test_head_plan_rejects_inconsistent_input(retrieval: tuple, streaming: tuple) -> None:
    with pytest.raises(DuoConfigError):
        HeadPlan(retrieval=retrieval, streaming=streaming)


def test_head_plan_from_non_bool_mask() -> None:
    with pytest.raises(DuoConfigError, match="boolean"):
        HeadPlan.from_mask(np.ones((2, 2)))


def test_check_shape() -> None:
    gates = np.zeros((32, 8))
    check_shape(gates, 32, 8, "bundled:X")
    with pytest.raises(DuoConfigError) as info:
        check_shape(gates, 30, 3, "bundled:Llama-X")
    message = str(info.value)
    for fragment in ("bundled:Llama-X", "32x8", "30x3", "VLLM_DUO_PATTERN"):
        assert fragment in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------
# Bundled patterns
# --------------------------------------------------------------------------------------------


def test_bundled_directory_contents() -> None:
    root = bundled_patterns_dir()
    assert root.is_dir()
    for name in ("LICENSE-duo-attention", "LICENSE-omniserve", "README.md"):
        assert (root / name).is_file(), name
    assert {b.name for b in list_bundled()} == EXPECTED_BUNDLED


@pytest.mark.parametrize("bundled", list_bundled(), ids=lambda b: b.name)
def test_bundled_pattern_loads_and_matches_summary(bundled: BundledPattern) -> None:
    expected = json.loads(COUNTS_FILE.read_text())[bundled.name]
    gates = load_gates(bundled.path)
    assert gates.shape == (bundled.num_layers, bundled.num_kv_heads)
    assert list(gates.shape) == expected["shape"]
    check_shape(gates, bundled.num_layers, bundled.num_kv_heads, bundled.name)
    assert bundled.shape["num_attention_heads"] % bundled.shape["num_kv_heads"] == 0
    assert bundled.shape["head_size"] == (64 if bundled.name in CALIBRATED_BUNDLED else 128)
    assert bundled.recommended_sparsity == expected["sparsity"] == 0.5
    assert bundled.model_ids
    plan = HeadPlan.from_mask(select_retrieval(gates, sparsity=bundled.recommended_sparsity))
    assert list(plan.counts_per_layer()) == expected["retrieval_per_layer"]
    assert plan.num_retrieval == expected["num_retrieval"]
    for name, digest in expected["sha256"].items():
        assert hashlib.sha256((bundled.path / name).read_bytes()).hexdigest() == digest, name
    config = json.loads((bundled.path / "config.json").read_text())
    assert config["sink_size"] == (64 if bundled.name in CALIBRATED_BUNDLED else 128)
    assert config["recent_size"] == 256


def test_design_facts_about_per_layer_counts() -> None:
    """DESIGN.md quotes these ranges at sparsity 0.5; keep docs and data consistent."""
    for name, low, high in [
        ("Llama-3-8B-Instruct-Gradient-1048k", 1, 8),
        ("Llama-2-7B-32K-Instruct", 4, 28),
    ]:
        counts = json.loads(COUNTS_FILE.read_text())[name]["retrieval_per_layer"]
        assert (min(counts), max(counts)) == (low, high)


def test_upstream_copies_are_byte_identical() -> None:
    upstream = REPO.parent / "shared" / "upstream-patterns"
    if not upstream.is_dir():
        pytest.skip("upstream pattern folder not available (only in the development workspace)")
    for name in UPSTREAM_BUNDLED:
        for file in (GATES_FILE, "config.json"):
            assert (REPO / "patterns" / name / file).read_bytes() == (
                upstream / name / file
            ).read_bytes()
    for file in ("LICENSE-duo-attention", "LICENSE-omniserve"):
        assert (REPO / "patterns" / file).read_bytes() == (upstream / file).read_bytes()


# --------------------------------------------------------------------------------------------
# resolve_pattern
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("gradientai/Llama-3-8B-Instruct-Gradient-1048k", "Llama-3-8B-Instruct-Gradient-1048k"),
        ("/models/Llama-3-8B-Instruct-Gradient-1048k", "Llama-3-8B-Instruct-Gradient-1048k"),
        ("/models/llama-3-8b-instruct-gradient-4194k/", "Llama-3-8B-Instruct-Gradient-4194k"),
        ("meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "Mistral-7B-Instruct-v0.2"),
        ("C:\\models\\Mistral-7B-Instruct-v0.3", "Mistral-7B-Instruct-v0.3"),
        ("togethercomputer/Llama-2-7B-32K-Instruct", "Llama-2-7B-32K-Instruct"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B-Instruct-v0.1"),
    ],
)
def test_resolve_by_model_id(model_id: str, expected: str) -> None:
    bundled = {b.name: b for b in list_bundled()}[expected]
    shape = (bundled.num_layers, bundled.num_kv_heads)
    for model_shape in (None, shape):
        path, label = resolve_pattern(None, model_id, model_shape)
        assert path == bundled.path
        assert expected in label


def test_resolve_by_name_and_path(tmp_path: Path) -> None:
    path, label = resolve_pattern("mistral-7b-instruct-V0.3", None, None)
    assert path.name == "Mistral-7B-Instruct-v0.3"
    assert "Mistral-7B-Instruct-v0.3" in label
    write_tsv(tmp_path / GATES_FILE, "1\t0\n")
    assert resolve_pattern(str(tmp_path), "whatever/model", (9, 9)) == (tmp_path, str(tmp_path))
    tsv = tmp_path / GATES_FILE
    assert resolve_pattern(str(tsv), None, None)[0] == tsv
    np.testing.assert_array_equal(load_gates(resolve_pattern(str(tsv), None, None)[0]), [[1, 0]])


def test_resolve_errors(tmp_path: Path) -> None:
    names = sorted(EXPECTED_BUNDLED)
    with pytest.raises(DuoConfigError) as info:
        resolve_pattern("no-such-pattern", None, None)
    message = str(info.value)
    assert "VLLM_DUO_PATTERN='no-such-pattern'" in message
    assert all(name in message for name in names)

    with pytest.raises(DuoConfigError) as info:
        resolve_pattern(str(tmp_path), None, None)
    assert GATES_FILE in str(info.value)
    assert str(tmp_path) in str(info.value)

    with pytest.raises(DuoConfigError) as info:
        resolve_pattern(None, "HuggingFaceTB/SmolLM2-360M-Instruct", (32, 5))
    message = str(info.value)
    for fragment in ("SmolLM2-360M-Instruct", "32x5", "VLLM_DUO_PATTERN", GATES_FILE):
        assert fragment in message
    assert all(name in message for name in names)
    assert "\n" not in message

    with pytest.raises(DuoConfigError, match="32x8"):
        resolve_pattern(None, "meta-llama/Llama-3.1-8B-Instruct", (30, 3))

    with pytest.raises(DuoConfigError, match="VLLM_DUO_PATTERN"):
        resolve_pattern(None, None, None)
    with pytest.raises(DuoConfigError, match="VLLM_DUO_PATTERN"):
        resolve_pattern("  ", "", None)


def test_list_bundled_reports_bad_model_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patterns, "bundled_patterns_dir", lambda: tmp_path)
    assert list_bundled() == []
    (tmp_path / "no-meta").mkdir()
    write_tsv(tmp_path / "no-meta" / GATES_FILE, "1\n")
    (tmp_path / "README.md").write_text("not a pattern")
    assert list_bundled() == []
    bad = tmp_path / "bad"
    bad.mkdir()
    write_tsv(bad / GATES_FILE, "1\n")
    (bad / "model.json").write_text("{not json")
    with pytest.raises(DuoConfigError, match=r"model\.json"):
        list_bundled()
    (bad / "model.json").write_text(json.dumps({"model_ids": ["a/b"], "shape": {"num_layers": 0}}))
    with pytest.raises(DuoConfigError, match="num_layers"):
        list_bundled()


def test_list_bundled_when_directory_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(patterns, "bundled_patterns_dir", lambda: tmp_path / "missing")
    assert list_bundled() == []
    with pytest.raises(DuoConfigError, match="none installed"):
        resolve_pattern(None, "a/b", None)


# --------------------------------------------------------------------------------------------
# PNG rendering (optional dependency)
# --------------------------------------------------------------------------------------------


def test_render_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    gates = np.linspace(-0.1, 1.1, 24).reshape(4, 6)
    mask = select_retrieval(gates, sparsity=0.5)
    out = patterns.render_png(gates, tmp_path / "p.png", mask=mask, title="test")
    assert out == tmp_path / "p.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DuoConfigError, match="shape"):
        patterns.render_png(gates, tmp_path / "q.png", mask=mask[:2])


def _main() -> int:
    if sys.argv[1:] != ["--regenerate-counts"]:
        print(__doc__)
        return 2
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(reference_counts(), indent=2)
    # One line per number list keeps the checked-in file short and its diffs readable.
    text = re.sub(
        r"\[\s+([-\d.,\s]+?)\s+\]",
        lambda m: "[" + ", ".join(m[1].split()).replace(",,", ",") + "]",
        text,
    )
    COUNTS_FILE.write_text(text + "\n")
    print(f"wrote {COUNTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
