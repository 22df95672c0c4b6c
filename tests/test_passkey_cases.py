"""Needle-in-a-haystack cases and scoring (pure, no vLLM): vllm_duo.evaluation.passkey/texts."""

from __future__ import annotations

import pytest

from vllm_duo.errors import DuoConfigError
from vllm_duo.evaluation.passkey import (
    FAMILIES,
    PasskeyCase,
    build_cases,
    first_number,
    make_case,
)
from vllm_duo.evaluation.texts import SOURCES, SentencePool, load_sentences


@pytest.fixture(scope="module")
def tokenizer(tiny_gqa):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gqa)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_text_sources_are_long_prose_that_rejoins(name):
    sentences = load_sentences(name)
    assert len(sentences) > 1000
    assert sum(map(len, sentences)) > 300_000  # enough for many 8K-token haystacks
    assert all(s.startswith((" ", "\n\n")) and s.strip() for s in sentences)
    assert load_sentences(name) is sentences  # read once per process


def test_sources_do_not_share_text():
    sets = {name: set(s.strip() for s in load_sentences(name)) for name in SOURCES}
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = {s for s in sets[a] & sets[b] if len(s) > 40}
            assert not common, (a, b, sorted(common)[:3])


def test_unknown_source_is_one_clear_error():
    with pytest.raises(DuoConfigError, match="text source 'nope' is unknown: expected one of"):
        load_sentences("nope")


def test_sentence_pool_runs_are_exact_and_wrap(tokenizer):
    pool = SentencePool(tokenizer, "newton-opticks")
    for start, budget in [(0, 1), (5, 300), (len(pool) - 2, 500)]:
        run = pool.run(start, budget)
        assert sum(map(len, run)) == budget
        assert run[0] == list(pool.ids[start % len(pool)])[:budget]
    wrapped = pool.run(len(pool) - 1, pool.num_tokens)  # longer than what is left: wraps
    assert wrapped[1] == list(pool.ids[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("depth", [0.0, 0.35, 1.0])
def test_case_is_exact_long_deterministic_and_hides_the_key_at_the_depth(tokenizer, family, depth):
    case = make_case(tokenizer, family, 1500, depth, seed=3)
    assert case.length == len(case.prompt_ids) == 1500
    assert make_case(tokenizer, family, 1500, depth, seed=3) == case
    assert make_case(tokenizer, family, 1500, depth, seed=4) != case
    assert make_case(tokenizer, family, 1500, depth, seed=3, index=1).key != case.key
    spec = FAMILIES[family]
    assert len(case.key) == spec.digits and case.key[0] != "0"
    text = tokenizer.decode(list(case.prompt_ids))
    needle = spec.needle.format(key=case.key, word=case.word).strip()
    assert text.count(needle) == 1
    # The needle's recorded position is where it is, and it sits near the asked depth.
    at = tokenizer.decode(list(case.prompt_ids[case.needle_position :]))
    assert at.strip().startswith(needle)
    question = spec.question.format(word=case.word)
    assert text.index(needle) < text.index(question)
    assert text.rstrip().endswith(spec.primer.format(word=case.word).rstrip())
    # Depth as a fraction of the haystack's characters (the frame is small against 1500).
    begin = text.index(spec.instruction) + len(spec.instruction) if spec.instruction else 0
    reached = (text.index(needle) - begin) / (text.index(question) - begin)
    assert abs(reached - depth) < 0.1, (reached, depth)


def test_families_differ_in_text_wording_and_key_format(tokenizer):
    sources = {f.source for f in FAMILIES.values()}
    assert len(sources) == len(FAMILIES)
    heldout, calibration = FAMILIES["heldout"], FAMILIES["calibration"]
    assert heldout.digits != calibration.digits
    assert heldout.question != calibration.question and heldout.needle != calibration.needle
    assert heldout.keyed_by_word and make_case(tokenizer, "heldout", 800, 0.5, 0).word


def test_grid_order_and_bad_inputs(tokenizer):
    cases = build_cases(tokenizer, "dev", (600, 900), (0.0, 0.5, 1.0), seed=1, per_cell=2)
    assert [(c.length, c.depth, c.index) for c in cases[:3]] == [
        (600, 0.0, 0),
        (600, 0.0, 1),
        (600, 0.5, 0),
    ]
    assert len(cases) == 12 and {c.length for c in cases} == {600, 900}
    with pytest.raises(ValueError, match=r"depth=1\.5"):
        make_case(tokenizer, "dev", 600, 1.5, 0)
    with pytest.raises(ValueError, match="family 'x' is unknown"):
        make_case(tokenizer, "x", 600, 0.5, 0)
    with pytest.raises(ValueError, match="use lengths of at least"):
        make_case(tokenizer, "heldout", 40, 0.5, 0)


def test_first_number_and_scoring():
    assert first_number(" 7143211.") == "7143211"
    assert first_number("is 1,234,567 I think") == "1234567"
    assert first_number("12345, 67890, 13579") == "12345"
    assert first_number("no digits") is None
    case = PasskeyCase(family="dev", length=0, depth=0.5, key="71432", word="", index=0,
                       prompt_ids=(), needle_position=0)  # fmt: skip
    assert case.correct(" 71432.")
    assert case.correct("The pass key is 71432, I think")
    assert not case.correct(" 714321")
    assert not case.correct(" 7143")
    assert not case.correct(" 12345 or 71432")  # the first number counts
    with pytest.raises(ValueError, match="depth"):
        PasskeyCase(family="dev", length=0, depth=1.5, key="1", word="", index=0,
                    prompt_ids=(), needle_position=0)  # fmt: skip
