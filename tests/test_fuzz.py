"""Fuzzing of what a user puts in front of the DUO backend at start-up: VLLM_DUO_* values and
pattern files.

Every input must end in exactly one of two ways:

- one :class:`DuoConfigError` (never another exception type, no chained traceback) whose
  message is one line, names the variable or the file, and says what is allowed; or
- a head plan equal to a direct computation written here (an independent reading of the
  documented rules), so nothing is accepted with a silently different meaning.

``test_settings.py`` and ``test_patterns.py`` fuzz single parsers (one variable's text, gate
matrices that are already valid); this module fuzzes whole environments and raw file bytes, and
drives them through :func:`vllm_duo.model_plan.plan_for`, the function the engine's start-up
validation (``patches/early_validation.py``) calls, with a stand-in for vLLM's config. That one
import loads vLLM (~12 s alone; the rest of the suite imports it anyway); everything else here is
pure. The last test starts real vLLM engines with values the fuzzing found.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from conftest import run_engine, write_pattern
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import GATES_FILE, list_bundled, load_gates
from vllm_duo.settings import MAX_TOKENS, DuoSettings

VARS = ("VLLM_DUO_PATTERN", "VLLM_DUO_SPARSITY", "VLLM_DUO_THRESHOLD", "VLLM_DUO_SINK",
        "VLLM_DUO_RECENT")  # fmt: skip
MODEL_ID = "fuzz/not-a-bundled-model"
# Words that say what is allowed, one of which every message must carry.
ALLOWED_WORDS = (
    "expected",
    "must",
    "allowed",
    "needs",
    "unset one",
    "limit",
    "set VLLM_DUO_PATTERN",
)
# DUO_FUZZ_EXAMPLES=5000 for a longer hunt; 300 keeps the module at ~15 s.
FUZZ = settings(
    max_examples=int(os.environ.get("DUO_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------
# The direct computation (independent of the library: no regular expressions, no shared code)
# --------------------------------------------------------------------------------------------


class Refused(Exception):
    """The reference refuses the input; ``names`` are the variables or files it blames."""

    def __init__(self, *names: str) -> None:
        super().__init__(names)
        self.names = names


DECIMAL_CHARS = set("0123456789+-.eE")


def ref_fraction(name: str, raw: str) -> float:
    text = raw.strip()
    # Only ASCII digits, sign, point and exponent: float() then rejects every malformed mix,
    # and no spelling such as "0.2_5", Arabic-Indic digits or "inf" can slip through.
    if not text or not set(text) <= DECIMAL_CHARS:
        raise Refused(name)
    try:
        value = float(text)
    except ValueError:
        raise Refused(name) from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise Refused(name)
    return value


def ref_count(name: str, raw: str, minimum: int) -> int:
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not minimum <= int(text) <= MAX_TOKENS:
        raise Refused(name)
    return int(text)


def ref_settings(env: dict[str, str]) -> dict[str, object]:
    """The documented meaning of the VLLM_DUO_* variables; blank counts as unset."""
    value = {k: v for k, v in env.items() if v.strip()}
    sparsity, threshold = value.get("VLLM_DUO_SPARSITY"), value.get("VLLM_DUO_THRESHOLD")
    if sparsity is not None and threshold is not None:
        raise Refused("VLLM_DUO_SPARSITY", "VLLM_DUO_THRESHOLD")
    bad, out = [], {}
    for key, parse, default in [
        ("VLLM_DUO_THRESHOLD", lambda r: ref_fraction("VLLM_DUO_THRESHOLD", r), None),
        ("VLLM_DUO_SPARSITY", lambda r: ref_fraction("VLLM_DUO_SPARSITY", r), None),
        ("VLLM_DUO_SINK", lambda r: ref_count("VLLM_DUO_SINK", r, 0), 64),
        ("VLLM_DUO_RECENT", lambda r: ref_count("VLLM_DUO_RECENT", r, 1), 256),
    ]:
        try:
            out[key] = default if key not in value else parse(value[key])
        except Refused:
            bad.append(key)
    if bad:
        raise Refused(*bad)
    if out["VLLM_DUO_THRESHOLD"] is None and out["VLLM_DUO_SPARSITY"] is None:
        out["VLLM_DUO_SPARSITY"] = 0.5
    pattern = value.get("VLLM_DUO_PATTERN")
    out["VLLM_DUO_PATTERN"] = None if pattern is None else pattern.strip()
    return out


def ref_read_tsv(data: bytes, name: str) -> np.ndarray:
    """Rows end at \\n, \\r\\n or \\r; cells split at tabs; blank tail lines dropped; clip."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(name) from None
    text = text.removeprefix("\ufeff")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines or "" in lines:
        raise Refused(name)
    rows = [[ref_cell(cell, name) for cell in line.split("\t")] for line in lines]
    if len({len(row) for row in rows}) != 1:
        raise Refused(name)
    return np.clip(np.array(rows, dtype=np.float64), 0.0, 1.0)


def ref_cell(cell: str, name: str) -> float:
    text = cell.strip()
    if not text or not set(text) <= DECIMAL_CHARS:
        raise Refused(name)
    try:
        value = float(text)
    except ValueError:
        raise Refused(name) from None
    if not math.isfinite(value):
        raise Refused(name)
    return value


def ref_select(gates: np.ndarray, sparsity: float | None, threshold: float | None) -> np.ndarray:
    """Top N - round(s*N) gates, ties to the lower flat index; or gate >= threshold."""
    flat = gates.ravel().tolist()
    if threshold is not None:
        chosen = {i for i, g in enumerate(flat) if g >= threshold}
    else:
        keep = len(flat) - round(sparsity * len(flat))
        chosen = set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:keep])
    return np.array([i in chosen for i in range(len(flat))]).reshape(gates.shape)


def ref_plan(env: dict[str, str], shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    """(retrieval mask, pattern source) the engine must use, or Refused."""
    conf = ref_settings(env)
    spec = conf["VLLM_DUO_PATTERN"]
    if spec is None:
        raise Refused("VLLM_DUO_PATTERN")  # MODEL_ID matches no bundled pattern
    bundled = {b.name.lower(): b for b in list_bundled()}
    if spec.lower() in bundled:
        pattern = bundled[spec.lower()]
        path, source = pattern.path / GATES_FILE, f"bundled:{pattern.name}"
    else:
        if spec.startswith("~") or len(spec.encode()) > 255 or "\x00" in spec:
            raise Refused("VLLM_DUO_PATTERN")  # not a path this fuzzing ever creates
        candidate = Path(spec)
        if candidate.is_dir():
            if not (candidate / GATES_FILE).is_file():
                raise Refused("VLLM_DUO_PATTERN")
            path = candidate / GATES_FILE
        elif candidate.is_file():
            path = candidate
        else:
            raise Refused("VLLM_DUO_PATTERN")
        source = str(candidate)
    gates = ref_read_tsv(path.read_bytes(), str(path))
    if gates.shape != shape:
        raise Refused(source)
    mask = ref_select(gates, conf["VLLM_DUO_SPARSITY"], conf["VLLM_DUO_THRESHOLD"])
    return mask, source


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

# os.environ cannot hold NUL or unpaired surrogates; everything else is fair game.
env_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TRICKY_NUMBERS = ["", " ", "0", "1", "0.5", ".5", "5.", "+0.5", "-0", "-0.0", "1e-1", "1E0",
                  "0x10", "1_0", "0.2_5", "\u0663", "\u0660.\u0665", "½", "²", "inf", "-inf", "NaN",
                  "Infinity",
                  "1e999", "1e-999", "\t0.25\n", "0.5 0.5", "1,5", "50%", "0.5f", "2147483647",
                  "2147483648", "007", "+5", "-1", "1.0", "64", "  256  ",
                  "\u30000.5", "\x1c1"]  # fmt: skip
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(-0.5, 1.5).map(lambda f: f"{f:.3g}"),
    st.integers(-5, 2**33).map(str),
    st.sampled_from(TRICKY_NUMBERS),
)
valid_fractions = st.floats(0.0, 1.0).flatmap(
    lambda f: st.sampled_from([repr(f), f"{f:.3f}", f"{f:e}", f" {f:.2g}\t"])
)
valid_counts = st.one_of(st.integers(0, 300), st.integers(0, MAX_TOKENS)).map(str)


def values_of(name: str) -> st.SearchStrategy[str]:
    """Values for one variable: half plausible, half anything."""
    good = valid_fractions if name in ("VLLM_DUO_SPARSITY", "VLLM_DUO_THRESHOLD") else valid_counts
    return st.one_of(good, good, numbers_as_text, st.text(env_chars, max_size=10))


# Each variable set or not; SPARSITY and THRESHOLD together (an error) in a quarter of cases.
environments = st.fixed_dictionaries({}, optional={name: values_of(name) for name in VARS[1:]})
# Plausible settings: at most one selector, S and W set or not.
plausible_environments = st.builds(
    lambda selector, fraction, counts: {**counts, **({selector: fraction} if selector else {})},
    st.sampled_from(["VLLM_DUO_SPARSITY", "VLLM_DUO_THRESHOLD", None]),
    valid_fractions,
    st.fixed_dictionaries({}, optional={"VLLM_DUO_SINK": valid_counts,
                                        "VLLM_DUO_RECENT": valid_counts}),
)  # fmt: skip


@st.composite
def cells(draw) -> str:
    """One cell of a pattern file: mostly numbers, sometimes something else."""
    return draw(st.one_of(
        st.floats(-0.2, 1.2).map(repr),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f:.6e}"),
        st.sampled_from(["nan", "inf", "-inf", "-1e-3", "1.5", "0_5", "٣", " 0.5", "0.5 ", "",
                         "0.5 0.5", "1e999", "\x1c0.5", "0.5\x0c0.7", "abc", "+.5", "5."]),
        st.text(env_chars, max_size=4),
    ))  # fmt: skip


GATE_FORMATS = [repr, "{:.18e}".format, "{:g}".format, "{:.3f}".format, " {} ".format]


@st.composite
def tsv_files(draw, kinds: tuple[str, ...] = ("clean", "table", "table", "bytes", "text")):
    """(file bytes, the model shape to load it for).

    clean: a valid table written in one of several number formats (np.savetxt's among them);
    table: rows of fuzzed cells, ragged widths, odd separators; bytes / text: anything.
    """
    kind = draw(st.sampled_from(kinds))
    layers, heads = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if kind == "bytes":
        data = draw(st.binary(max_size=120))
    elif kind == "text":
        data = draw(st.text(max_size=120)).encode("utf-8", "surrogatepass")
    else:
        clean = kind == "clean"
        rows = []
        for _ in range(layers):
            width = heads if clean or draw(st.integers(0, 5)) else draw(st.integers(1, 6))
            if clean:
                fmt = draw(st.sampled_from(GATE_FORMATS))
                row = [fmt(draw(st.floats(-0.5, 1.5))) for _ in range(width)]
            else:
                row = [draw(cells()) for _ in range(width)]
            ends = ["", "", " "] if clean else ["", "", " ", "\t", "\x0c"]
            rows.append("\t".join(row) + draw(st.sampled_from(ends)))
        breaks = ["\n", "\r\n", "\r"] if clean else ["\n", "\n", "\r\n", "\n\n", "\x0c", "\u2028"]
        text = draw(st.sampled_from(breaks)).join(rows)
        text += draw(st.sampled_from(["", "\n", "\n\n  \n", "\r\n"]))
        if draw(st.booleans()):
            text = "\ufeff" + text
        data = text.encode("utf-8")
    if draw(st.integers(0, 3)) == 0:
        layers, heads = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return data, (layers, heads)


@st.composite
def pattern_specs(draw, directory: Path, tsv: Path) -> str | None:
    """A VLLM_DUO_PATTERN value: the fuzzed file (as directory or file), or something else."""
    choice = draw(st.integers(0, 9))
    if choice <= 4:
        return str(directory)
    if choice == 5:
        return str(tsv)
    if choice == 6:
        name = draw(st.sampled_from(sorted(b.name for b in list_bundled())))
        return draw(st.sampled_from([name, name.lower(), f"  {name.upper()} "]))
    if choice == 7:
        return None
    return draw(st.one_of(
        st.text(env_chars, max_size=12),
        st.sampled_from(["~nosuchuser-duo/p", "~", "a" * 300, "/nonexistent/x", ".", "/",
                         "/dev/null", "/proc/self", str(directory / "missing")]),
    ))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Checks shared by the fuzz tests
# --------------------------------------------------------------------------------------------


def check_error(exc: BaseException, blamed: tuple[str, ...]) -> None:
    """One DuoConfigError, one line, naming a blamed variable or file, saying what is allowed."""
    assert type(exc) is DuoConfigError, f"{type(exc).__name__}: {exc}"
    # `raise ... from None` (or no context at all): the user reads one error, not a chain.
    assert exc.__cause__ is None, repr(exc.__cause__)
    assert exc.__context__ is None or exc.__suppress_context__, repr(exc.__context__)
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    assert any(name in message for name in blamed), f"none of {blamed} in {message!r}"
    assert any(word in message for word in ALLOWED_WORDS), f"no allowed values in {message!r}"


def outcome(call):
    try:
        return call(), None
    except Exception as exc:  # the assertions decide which exceptions were fine
        return None, exc


# --------------------------------------------------------------------------------------------
# Pure: settings and pattern files (no vLLM)
# --------------------------------------------------------------------------------------------


@FUZZ
@given(env=environments)
@example(env={"VLLM_DUO_SPARSITY": "0.2_5"})  # was read as 0.25
@example(env={"VLLM_DUO_THRESHOLD": "\u0660.\u0665"})  # was read as 0.5
def test_settings_are_refused_or_mean_what_they_say(env: dict[str, str]) -> None:
    got, exc = outcome(lambda: DuoSettings.from_env(env))
    try:
        want = ref_settings(env)
    except Refused as refused:
        event("refused")
        assert exc is not None, f"accepted {env!r} as {got}"
        check_error(exc, tuple(f"{name}={env[name]!r}" for name in refused.names))
        return
    event("accepted")
    assert exc is None, f"refused {env!r}: {exc!r}"
    assert got.sparsity == want["VLLM_DUO_SPARSITY"]
    assert got.threshold == want["VLLM_DUO_THRESHOLD"]
    assert (got.sink, got.recent) == (want["VLLM_DUO_SINK"], want["VLLM_DUO_RECENT"])


@FUZZ
@given(case=tsv_files(), as_dir=st.booleans())
@example(case=(b"0_5\t1\n", (1, 2)), as_dir=True)  # was read as gates 1, 1
@example(case=("\u0663\t0\n".encode(), (1, 2)), as_dir=True)  # was read as 3 -> 1, 0
@example(case=(b"0.5\x0c0.7\t1\n", (1, 2)), as_dir=False)  # was two rows
@example(case=("1\t0\u20280\t1\n".encode(), (2, 2)), as_dir=False)  # was two rows
@example(case=(b"\x1c0.5\t1\n", (1, 2)), as_dir=False)  # whitespace around a cell is fine
def test_pattern_files_are_refused_or_read_exactly(
    case: tuple[bytes, tuple[int, int]], as_dir: bool
) -> None:
    data, _ = case
    with tempfile.TemporaryDirectory(prefix="duo-fuzz-") as tmp:
        tsv = Path(tmp) / GATES_FILE
        tsv.write_bytes(data)
        got, exc = outcome(lambda: load_gates(tmp if as_dir else tsv))
        try:
            want = ref_read_tsv(data, str(tsv))
        except Refused:
            event("refused")
            assert exc is not None, f"accepted {data!r} as {got}"
            check_error(exc, (str(tsv),))
            return
        event("accepted")
        assert exc is None, f"refused {data!r}: {exc!r}"
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "spec", ["~nosuchuser-duo/pattern", "a" * 300, "/tmp/" + "b" * 256 + "/x"],
    ids=["unknown-user-home", "name-too-long", "component-too-long"],
)  # fmt: skip
def test_unusable_pattern_paths_are_config_errors(spec: str) -> None:
    """Found by fuzzing: these raised RuntimeError / OSError tracebacks before."""
    from vllm_duo.patterns import resolve_pattern

    _, exc = outcome(lambda: resolve_pattern(spec, None, None))
    check_error(exc, (f"VLLM_DUO_PATTERN={spec!r}",))
    _, exc = outcome(lambda: load_gates(spec))
    check_error(exc, (spec,))


def test_unreadable_pattern_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tsv = write_pattern(tmp_path / "p", [[1.0, 0.0]]) / GATES_FILE

    def denied(self: Path) -> bytes:
        # chmod 0 would not stop root, who runs these tests in CI containers.
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    _, exc = outcome(lambda: load_gates(tsv))
    check_error(exc, (str(tsv),))
    assert "Permission denied" in str(exc)


# --------------------------------------------------------------------------------------------
# End to end: the function the engine's start-up validation calls
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan_for():
    from vllm_duo.model_plan import plan_for

    return plan_for


def fake_vllm_config(layers: int, kv_heads: int) -> SimpleNamespace:
    """What plan_for reads of vLLM's config, nothing more."""
    model_config = SimpleNamespace(
        model=MODEL_ID, max_model_len=4096, get_total_num_kv_heads=lambda: kv_heads,
        hf_text_config=SimpleNamespace(num_hidden_layers=layers),
    )  # fmt: skip
    return SimpleNamespace(model_config=model_config,
                           parallel_config=SimpleNamespace(tensor_parallel_size=1))  # fmt: skip


@FUZZ
@given(case=tsv_files(kinds=("clean", "clean", "clean", "table", "bytes", "text")), data=st.data())
def test_engine_start_up_refuses_or_uses_the_direct_plan(plan_for, case, data) -> None:
    file_bytes, shape = case
    with tempfile.TemporaryDirectory(prefix="duo-fuzz-") as tmp:
        directory = Path(tmp)
        tsv = directory / GATES_FILE
        tsv.write_bytes(file_bytes)
        env = data.draw(st.one_of(environments, plausible_environments), label="env")
        spec = data.draw(pattern_specs(directory, tsv), label="VLLM_DUO_PATTERN")
        if spec is not None:
            env["VLLM_DUO_PATTERN"] = spec
        clean = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
        # plan_for reads os.environ itself, as in the engine.
        with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
            got, exc = outcome(lambda: plan_for(fake_vllm_config(*shape)))
        try:
            mask, source = ref_plan(env, shape)
        except Refused as refused:
            event(f"refused: {refused.names[0] if refused.names[0] in VARS else 'file'}")
            assert exc is not None, f"accepted {env!r} with {file_bytes!r}: {got}"
            # Settings errors quote the value; pattern errors may say "VLLM_DUO_PATTERN is unset".
            blamed = tuple(
                f"{n}={env[n]!r}" if n in env and n != "VLLM_DUO_PATTERN" else n
                for n in refused.names
            )
            check_error(exc, (*blamed, str(tsv)))
            return
        event("accepted")
        assert exc is None, f"refused {env!r} with {file_bytes!r}: {exc!r}"
        np.testing.assert_array_equal(got.heads.to_mask(), mask)
        assert got.source == source


# --------------------------------------------------------------------------------------------
# Real vLLM: values the fuzzing found stop start-up with one line
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VLLM_DUO_PATTERN": "~nosuchuser-duo/pattern"},
         ["VLLM_DUO_PATTERN='~nosuchuser-duo/pattern'", "cannot be used as a path"]),
        ({"VLLM_DUO_SPARSITY": "0.2_5"}, ["VLLM_DUO_SPARSITY='0.2_5'", "[0, 1]"]),
    ],
    ids=["unknown-user-home", "underscore-fraction"],
)  # fmt: skip
def test_fuzz_found_values_fail_engine_start_up(tmp_path, tiny_gqa, env, expected) -> None:
    if "VLLM_DUO_PATTERN" not in env:
        env = {"VLLM_DUO_PATTERN": str(write_pattern(tmp_path / "p", [[1, 0]] * 4)), **env}
    log = run_engine(tmp_path, tiny_gqa, [[7, 8, 9]], env=env, expect_failure=True)
    lines = [ln for ln in log.splitlines() if "DuoConfigError:" in ln or "Value error, " in ln]
    assert lines, f"no DuoConfigError in the log:\n{log[-3000:]}"
    for text in expected:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    # Not the tracebacks of before (RuntimeError from pathlib, or a silently accepted value).
    assert "RuntimeError" not in log and "OSError" not in log
