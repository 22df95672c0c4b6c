"""Tests of vllm_duo.settings: VLLM_DUO_* parsing and validation (never imports vllm)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_duo.errors import DuoConfigError
from vllm_duo.settings import ENV_VARS, MAX_TOKENS, DuoSettings, kernels_from_env

ALL_VARS = (
    "VLLM_DUO_PATTERN",
    "VLLM_DUO_SPARSITY",
    "VLLM_DUO_THRESHOLD",
    "VLLM_DUO_SINK",
    "VLLM_DUO_RECENT",
)


def test_error_type_is_value_error() -> None:
    assert issubclass(DuoConfigError, ValueError)


def test_defaults() -> None:
    settings = DuoSettings.from_env({})
    assert settings == DuoSettings()
    assert settings.pattern is None
    assert settings.sparsity == 0.5
    assert settings.threshold is None
    assert (settings.sink, settings.recent) == (64, 256)
    assert settings.selection_kwargs() == {"sparsity": 0.5}


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_DUO_SPARSITY", "0.75")
    monkeypatch.setenv("VLLM_DUO_SINK", "0")
    monkeypatch.setenv("VLLM_DUO_PATTERN", " Mistral-7B-Instruct-v0.2 ")
    settings = DuoSettings.from_env()
    assert settings.sparsity == 0.75
    assert settings.sink == 0
    assert settings.pattern == "Mistral-7B-Instruct-v0.2"


def test_full_environment() -> None:
    settings = DuoSettings.from_env(
        {
            "VLLM_DUO_PATTERN": "/p/x",
            "VLLM_DUO_THRESHOLD": "0.6",
            "VLLM_DUO_SINK": "128",
            "VLLM_DUO_RECENT": "1",
            "UNRELATED": "1.5",
        }
    )
    assert settings == DuoSettings(pattern="/p/x", threshold=0.6, sink=128, recent=1)
    assert settings.sparsity is None
    assert settings.selection_kwargs() == {"threshold": 0.6}


def test_empty_strings_mean_unset() -> None:
    assert DuoSettings.from_env(dict.fromkeys(ALL_VARS, "")) == DuoSettings()
    assert DuoSettings.from_env(dict.fromkeys(ALL_VARS, "  ")) == DuoSettings()
    settings = DuoSettings.from_env({"VLLM_DUO_SPARSITY": "", "VLLM_DUO_THRESHOLD": "0.3"})
    assert (settings.sparsity, settings.threshold) == (None, 0.3)


@pytest.mark.parametrize("raw", ["0", "1", "0.25", " 0.5 ", "1e-1", "1.0", "0."])
def test_good_fractions(raw: str) -> None:
    assert DuoSettings.from_env({"VLLM_DUO_SPARSITY": raw}).sparsity == float(raw)
    assert DuoSettings.from_env({"VLLM_DUO_THRESHOLD": raw}).threshold == float(raw)


@pytest.mark.parametrize("raw", ["0", "1", "64", " 256 ", "007", str(MAX_TOKENS)])
def test_good_counts(raw: str) -> None:
    assert DuoSettings.from_env({"VLLM_DUO_SINK": raw}).sink == int(raw)
    if int(raw) >= 1:
        assert DuoSettings.from_env({"VLLM_DUO_RECENT": raw}).recent == int(raw)


BAD_VALUES = [
    ("VLLM_DUO_SPARSITY", "1.5", "out of range"),
    ("VLLM_DUO_SPARSITY", "-0.1", "out of range"),
    ("VLLM_DUO_SPARSITY", "nan", "finite"),
    ("VLLM_DUO_SPARSITY", "inf", "finite"),
    ("VLLM_DUO_SPARSITY", "-inf", "finite"),
    ("VLLM_DUO_SPARSITY", "abc", "not a number"),
    ("VLLM_DUO_SPARSITY", "0,5", "not a number"),
    ("VLLM_DUO_SPARSITY", "50%", "not a number"),
    ("VLLM_DUO_THRESHOLD", "1.01", "out of range"),
    ("VLLM_DUO_THRESHOLD", "NaN", "finite"),
    ("VLLM_DUO_THRESHOLD", "high", "not a number"),
    ("VLLM_DUO_SINK", "6.4", "integer"),
    ("VLLM_DUO_SINK", "-1", "integer"),
    ("VLLM_DUO_SINK", "abc", "integer"),
    ("VLLM_DUO_SINK", "1e3", "integer"),
    ("VLLM_DUO_SINK", "+5", "integer"),
    ("VLLM_DUO_SINK", "0x10", "integer"),
    ("VLLM_DUO_SINK", "\u0663", "integer"),  # Arabic-Indic digit three: isdigit() but not 0-9
    ("VLLM_DUO_SINK", "1_000", "integer"),
    ("VLLM_DUO_SINK", str(MAX_TOKENS + 1), "out of range"),
    ("VLLM_DUO_RECENT", "0", "out of range"),
    ("VLLM_DUO_RECENT", "-5", "integer"),
    ("VLLM_DUO_RECENT", "256.0", "integer"),
    ("VLLM_DUO_RECENT", "lots", "integer"),
]


@pytest.mark.parametrize(("name", "raw", "fragment"), BAD_VALUES)
def test_bad_values_name_variable_and_value(name: str, raw: str, fragment: str) -> None:
    with pytest.raises(DuoConfigError) as info:
        DuoSettings.from_env({name: raw})
    message = str(info.value)
    assert f"{name}={raw!r}" in message
    assert fragment in message
    assert "\n" not in message


def test_sparsity_out_of_range_message_is_the_documented_one() -> None:
    with pytest.raises(DuoConfigError) as info:
        DuoSettings.from_env({"VLLM_DUO_SPARSITY": "1.5"})
    assert str(info.value) == (
        "VLLM_DUO_SPARSITY='1.5' is out of range: expected a float in [0, 1] "
        "(fraction of KV heads that become streaming heads)."
    )


def test_both_sparsity_and_threshold_is_an_error() -> None:
    with pytest.raises(DuoConfigError) as info:
        DuoSettings.from_env({"VLLM_DUO_SPARSITY": "0.5", "VLLM_DUO_THRESHOLD": "0.7"})
    message = str(info.value)
    assert "VLLM_DUO_SPARSITY='0.5'" in message
    assert "VLLM_DUO_THRESHOLD='0.7'" in message
    # Even when one of them is invalid, the conflict is what gets reported.
    with pytest.raises(DuoConfigError, match="VLLM_DUO_THRESHOLD"):
        DuoSettings.from_env({"VLLM_DUO_SPARSITY": "x", "VLLM_DUO_THRESHOLD": "0.7"})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sparsity": 1.5}, "VLLM_DUO_SPARSITY=1.5"),
        ({"sparsity": float("nan")}, "VLLM_DUO_SPARSITY=nan"),
        ({"sparsity": "0.5"}, "VLLM_DUO_SPARSITY='0.5'"),
        ({"sparsity": True}, "VLLM_DUO_SPARSITY=True"),
        ({"threshold": -1.0}, "VLLM_DUO_THRESHOLD=-1.0"),
        ({"sparsity": 0.5, "threshold": 0.5}, "VLLM_DUO_THRESHOLD=0.5"),
        ({"sink": -1}, "VLLM_DUO_SINK=-1"),
        ({"sink": 6.4}, "VLLM_DUO_SINK=6.4"),
        ({"sink": True}, "VLLM_DUO_SINK=True"),
        ({"recent": 0}, "VLLM_DUO_RECENT=0"),
        ({"recent": MAX_TOKENS + 1}, "VLLM_DUO_RECENT="),
        ({"pattern": ""}, "VLLM_DUO_PATTERN=''"),
        ({"pattern": 3}, "VLLM_DUO_PATTERN=3"),
    ],
)
def test_direct_construction_is_validated(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(DuoConfigError) as info:
        DuoSettings(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_direct_construction_normalises_and_is_frozen() -> None:
    settings = DuoSettings(sparsity=1, sink=0, recent=1)
    assert isinstance(settings.sparsity, float)
    assert settings.sparsity == 1.0
    assert DuoSettings(threshold=0.3).sparsity is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sink = 5  # type: ignore[misc]


def test_env_vars_declaration() -> None:
    assert set(ENV_VARS) == {*ALL_VARS, "VLLM_DUO_KERNELS"}
    for name, help_text in ENV_VARS.items():
        assert help_text, name
        assert "\n" not in help_text, name


@pytest.mark.parametrize(
    ("raw", "choice"),
    [(None, "auto"), ("", "auto"), ("  ", "auto"), ("auto", "auto"), ("native", "native"),
     (" Triton ", "triton"), ("NATIVE", "native")],
)  # fmt: skip
def test_kernel_choice(raw: str | None, choice: str) -> None:
    env = {} if raw is None else {"VLLM_DUO_KERNELS": raw}
    assert kernels_from_env(env) == choice


@pytest.mark.parametrize("raw", ["cuda", "cpu", "triton,native", "0", "trit0n"])
def test_bad_kernel_choice_names_variable_value_and_choices(raw: str) -> None:
    with pytest.raises(DuoConfigError) as info:
        kernels_from_env({"VLLM_DUO_KERNELS": raw})
    message = str(info.value)
    assert f"VLLM_DUO_KERNELS={raw!r}" in message
    assert all(name in message for name in ("auto", "native", "triton"))
    assert "\n" not in message


def test_describe() -> None:
    assert DuoSettings().describe() == "pattern=auto sparsity=0.5 sink=64 recent=256"
    text = DuoSettings(
        pattern="Mixtral-8x7B-Instruct-v0.1", threshold=0.25, sink=0, recent=8
    ).describe()
    assert text == "pattern=Mixtral-8x7B-Instruct-v0.1 threshold=0.25 sink=0 recent=8"


@given(st.floats(0.0, 1.0))
def test_any_fraction_roundtrips(value: float) -> None:
    assert DuoSettings.from_env({"VLLM_DUO_SPARSITY": repr(value)}).sparsity == value


@given(st.integers(0, MAX_TOKENS), st.integers(1, MAX_TOKENS))
def test_any_count_roundtrips(sink: int, recent: int) -> None:
    settings = DuoSettings.from_env({"VLLM_DUO_SINK": str(sink), "VLLM_DUO_RECENT": str(recent)})
    assert (settings.sink, settings.recent) == (sink, recent)


@given(st.text(max_size=8))
def test_arbitrary_text_either_parses_or_raises_config_error(raw: str) -> None:
    for name in ALL_VARS[1:]:
        message = ""
        try:
            DuoSettings.from_env({name: raw})
        except DuoConfigError as exc:
            message = str(exc)
        assert not message or name in message
