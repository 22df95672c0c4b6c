"""Passkey cases for the accuracy harness (pure, no vLLM)."""

from __future__ import annotations

import pytest

from vllm_duo.evaluation.passkey import ANSWER_PREFIX, PasskeyCase, make_case


@pytest.fixture(scope="module")
def tokenizer(tiny_gqa):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gqa)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_case_hides_the_key_at_the_depth(tokenizer, depth):
    case = make_case(tokenizer, 1500, depth, seed=3)
    assert case.prompt.endswith(ANSWER_PREFIX)
    position = case.prompt.index(f"The pass key is {case.passkey}.") / len(case.prompt)
    assert abs(position - depth) < 0.15
    assert 1200 < len(tokenizer.encode(case.prompt)) <= 1600
    assert make_case(tokenizer, 1500, depth, seed=3) == case


def test_scoring_needs_the_exact_number():
    case = PasskeyCase(length=10, depth=0.5, passkey="71432", prompt="")
    assert case.correct(" 71432.")
    assert case.correct(" is 71432, I think")
    assert not case.correct(" 714321")
    assert not case.correct(" 7143")
    with pytest.raises(ValueError, match="depth"):
        PasskeyCase(length=10, depth=1.5, passkey="1", prompt="")
