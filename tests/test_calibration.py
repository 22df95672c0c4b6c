"""``vllm-duo calibrate``: prompts, the gated attention hook, training, resume, output.

Everything runs on tiny random-weight Llamas (2 layers, 2 KV heads) with 96-160-token prompts
and S=4, W=16, so streaming and full attention differ from the 21st token on.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_duo.calibration.data import PasskeyDataset
from vllm_duo.calibration.gated_attention import (
    HOLDER_ATTR,
    GateHolder,
    _tile_plan,
    gated_attention_forward,
    streaming_attention,
)
from vllm_duo.calibration.train import CHECKPOINT_FILE, CalibrationConfig, calibrate
from vllm_duo.cli import main
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import GATES_FILE, load_gates
from vllm_duo.reference import duo_attention

HEAD_DIM = 32
SMALL = {"sink": 4, "recent": 16, "min_len": 96, "max_len": 160, "passkeys": 1, "lr": 0.1}


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory) -> Path:
    """2 layers, 4 query heads over 2 KV heads, random weights."""
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.getbasetemp() / "calib-tiny2",
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=HEAD_DIM,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny2, local_files_only=True)


def _config(model: Path, out: Path, **overrides) -> CalibrationConfig:
    return CalibrationConfig(model=model, out=out, **{**SMALL, **overrides})


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_passkey_prompts_are_exact_deterministic_and_answerable(tokenizer):
    data = PasskeyDataset(tokenizer, min_len=150, max_len=400, num_passkeys=3, seed=7)
    lengths = {data.length_for_step(step) for step in range(40)}
    assert min(lengths) >= 150 and max(lengths) <= 400 and len(lengths) > 10
    for step in range(4):
        batch = data.batch(step, 2)
        assert batch == data.batch(step, 2)  # pure function of (seed, step, index)
        assert batch[0] != batch[1]
        for sample in batch:
            assert len(sample.input_ids) == data.length_for_step(step)
            answer = tokenizer.decode([sample.input_ids[p] for p in sample.answer_positions])
            assert answer == ", ".join(sample.passkeys)
            assert sample.answer_positions[-1] == len(sample.input_ids) - 1
            assert sample.loss_positions == tuple(p - 1 for p in sample.answer_positions)
            for key, pos in zip(sample.passkeys, sample.passkey_positions):
                sentence = tokenizer.decode(list(sample.input_ids[pos : pos + 20]))
                assert sentence.strip().startswith(f"The pass key is {key}. Remember it.")
            assert sorted(sample.passkey_positions) == list(sample.passkey_positions)
            assert sample.passkey_positions[-1] < sample.answer_positions[0]
    other_seed = PasskeyDataset(tokenizer, min_len=150, max_len=400, num_passkeys=3, seed=8)
    assert other_seed.batch(0, 1) != data.batch(0, 1)


def test_natural_text_haystack_and_log_uniform_lengths(tokenizer):
    from vllm_duo.evaluation.texts import load_sentences

    data = PasskeyDataset(tokenizer, min_len=150, max_len=1200, num_passkeys=2, seed=7,
                          haystack="python-reference", length_dist="log-uniform")  # fmt: skip
    sample = data.sample(400, 0, 0)
    assert len(sample.input_ids) == 400 and data.sample(400, 0, 0) == sample
    text = tokenizer.decode(list(sample.input_ids))
    # The haystack is consecutive sentences of the Python language reference.
    reference = "".join(load_sentences("python-reference"))
    words = [w for w in text.split() if len(w) > 3][5:25]
    assert sum(w in reference for w in words) >= 15
    for key in sample.passkeys:
        assert f"The pass key is {key}. Remember it." in text
    lengths = [data.length_for_step(step) for step in range(600)]
    assert min(lengths) >= 150 and max(lengths) <= 1200
    # Log-uniform: about as many steps in [150, 424) as in [424, 1200] (424 = sqrt(150*1200)).
    short = sum(n < 424 for n in lengths)
    assert 240 < short < 360, short
    with pytest.raises(DuoConfigError, match="--length-dist='cubic' is invalid"):
        PasskeyDataset(tokenizer, min_len=150, max_len=400, num_passkeys=1, seed=0,
                       length_dist="cubic")  # fmt: skip
    with pytest.raises(DuoConfigError, match="--haystack='books' is invalid"):
        PasskeyDataset(tokenizer, min_len=150, max_len=400, num_passkeys=1, seed=0,
                       haystack="books")  # fmt: skip


def test_far_mass_matches_a_dense_softmax():
    from vllm_duo.calibration.attention_mass import far_mass

    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    rows = torch.tensor([5, 20, 39])
    got = far_mass(query, key, rows, sink=2, recent=6, scale=0.3)
    for h in range(4):
        k = key[0, h // 2]
        for r, p in enumerate(rows.tolist()):
            probs = torch.softmax(query[0, h, p] @ k[: p + 1].T * 0.3, dim=-1)
            want = probs[2 : max(2, p - 6 + 1)].sum()
            assert got[0, h, r] == pytest.approx(float(want), abs=1e-6)
    assert got[0, :, 0].abs().max() < 1e-7  # row 5: every key is sink or window


def test_passkey_prompt_too_short_names_min_len(tokenizer):
    with pytest.raises(DuoConfigError, match="--min-len=20 is too short"):
        PasskeyDataset(tokenizer, min_len=20, max_len=400, num_passkeys=3, seed=0)


# --------------------------------------------------------------------------------------------
# Gated attention hook
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seq_len=st.integers(1, 70),
    sink=st.integers(0, 12),
    recent=st.integers(1, 30),
    tile=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
)
@example(seq_len=5, sink=0, recent=1, tile=3, kv_heads=1, group=1)  # padding rows, no sinks
@example(seq_len=64, sink=4, recent=16, tile=64, kv_heads=2, group=3)  # one tile
def test_tiled_streaming_attention_matches_reference(seq_len, sink, recent, tile, kv_heads, group):
    """Outputs and gradients equal the dense reference (padding tiles included)."""
    gen = torch.Generator().manual_seed(seq_len * 1000 + sink * 31 + recent)
    q = torch.randn(2, kv_heads * group, seq_len, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, seq_len, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, seq_len, 8, generator=gen, requires_grad=True)
    weights = torch.randn(q.shape, generator=gen)
    out = streaming_attention(q, k, v, sink=sink, recent=recent, scale=0.5, tile=tile)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref = torch.stack(
        [
            duo_attention(q[b], k[b], v[b], [True] * kv_heads, sink=sink, recent=recent, scale=0.5)
            for b in range(2)
        ]
    )
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # No all-masked row, padding rows included (some SDPA kernels return NaN for those).
    _, visible = _tile_plan(seq_len, sink, recent, min(tile, seq_len), "cpu")
    assert visible.any(dim=-1).all()


def test_gated_hook_mixes_full_and_streaming_per_kv_head():
    gen = torch.Generator().manual_seed(0)
    seq_len, sink, recent = 48, 3, 9
    q = torch.randn(1, 4, seq_len, 8, generator=gen)
    k = torch.randn(1, 2, seq_len, 8, generator=gen)
    v = torch.randn(1, 2, seq_len, 8, generator=gen)
    gates = torch.tensor([[0.0, 0.0], [1.0, 0.25]])
    holder = GateHolder(gates=gates, sink=sink, recent=recent, tile=16)
    module = SimpleNamespace(layer_idx=1, **{HOLDER_ATTR: holder})
    out, weights = gated_attention_forward(module, q, k, v, None, scaling=0.4)
    assert weights is None and out.shape == (1, seq_len, 4, 8)  # [B, T, Hq, D]
    full = duo_attention(q[0], k[0], v[0], [False, False], sink=sink, recent=recent, scale=0.4)
    stream = duo_attention(q[0], k[0], v[0], [True, True], sink=sink, recent=recent, scale=0.4)
    expected = torch.cat((full[:2], 0.25 * full[2:] + 0.75 * stream[2:]))  # KV head 1: q 2, 3
    torch.testing.assert_close(out[0].transpose(0, 1), expected, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(full[2:], stream[2:], atol=1e-3)  # the mix is visible
    with holder.teacher():
        teacher, _ = gated_attention_forward(module, q, k, v, None, scaling=0.4)
    torch.testing.assert_close(teacher[0].transpose(0, 1), full, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("gate", [0.0, 1.0])
def test_gated_model_matches_the_reference_model(tiny2, gate):
    """Through a whole transformers model: gates 0 = all-streaming reference, 1 = full."""
    from transformers import AutoModel

    from vllm_duo.calibration.gated_attention import attach_gates, register_attention
    from vllm_duo.reference import ReferencePattern, use_reference_pattern

    ids = torch.tensor([list(range(10, 130))])
    gated = AutoModel.from_pretrained(
        tiny2, local_files_only=True, attn_implementation=register_attention()
    )
    attach_gates(gated, GateHolder(gates=torch.full((2, 2), gate), sink=4, recent=16, tile=32))
    outputs = {}
    # The reference pattern is process-global: put back whatever another test installed.
    saved = (ReferencePattern.streaming, ReferencePattern.sink, ReferencePattern.recent)
    try:
        for retrieval in (True, False):
            name = use_reference_pattern(np.full((2, 2), retrieval), sink=4, recent=16)
            model = AutoModel.from_pretrained(
                tiny2, local_files_only=True, attn_implementation=name
            )
            with torch.no_grad():
                outputs[retrieval] = model(input_ids=ids).last_hidden_state
    finally:
        ReferencePattern.streaming, ReferencePattern.sink, ReferencePattern.recent = saved
    with torch.no_grad():
        got = gated(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, outputs[gate == 1.0], atol=1e-4, rtol=1e-4)
    assert (outputs[True] - outputs[False]).abs().max() > 0.1  # the two really differ


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _one_head_model(base: Path, target: Path, important: tuple[int, int]) -> Path:
    """Copy ``base`` with every KV head but ``important`` silenced (all-zero values).

    A silenced head outputs exactly 0 under full and streaming attention alike, so the
    distillation loss does not depend on its gate: only the L1 term acts and must drive it to
    0. The important head's full and streaming outputs differ, so its gate must stay high.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, target)
    weights = load_file(target / "model.safetensors")
    for layer in range(2):
        v_proj = weights[f"model.layers.{layer}.self_attn.v_proj.weight"]
        for kv_head in range(2):
            if (layer, kv_head) != important:
                v_proj[kv_head * HEAD_DIM : (kv_head + 1) * HEAD_DIM] = 0.0
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("important", [(0, 1), (1, 0)])
def test_gates_keep_the_head_that_matters_and_drop_the_others(tiny2, tmp_path, important):
    model = _one_head_model(tiny2, tmp_path / "model", important)
    out = calibrate(_config(model, tmp_path / "pattern", steps=12, reg=0.05))
    gates = load_gates(out)
    others = [gates[i, j] for i in range(2) for j in range(2) if (i, j) != important]
    # 12 Adam steps of lr 0.1 on a constant L1 gradient take a silenced head's gate to 0.
    assert max(others) < 0.05, gates
    assert gates[important] > 0.8, gates
    assert gates[important] > max(others) + 0.7, gates


def test_resume_reaches_the_same_gates_as_an_uninterrupted_run(tiny2, tmp_path):
    straight = calibrate(_config(tiny2, tmp_path / "straight", steps=6, save_every=2))
    first = calibrate(_config(tiny2, tmp_path / "resumed", steps=3))
    assert torch.load(first / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    resumed = calibrate(_config(tiny2, tmp_path / "resumed", steps=6, resume=True))

    a = torch.load(straight / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(resumed / CHECKPOINT_FILE, weights_only=True)
    assert a["step"] == b["step"] == 6
    assert torch.equal(a["gates"], b["gates"]), (a["gates"], b["gates"])
    assert a["losses"] == b["losses"]
    assert not torch.equal(a["gates"], torch.ones_like(a["gates"]))  # training did something
    np.testing.assert_array_equal(load_gates(straight), load_gates(resumed))

    # model.json says how to repeat the run and where its time went, stretch by stretch.
    made = json.loads((resumed / "model.json").read_text())["calibration"]
    assert made["steps"] == made["steps_timed"] == 6
    assert [s["steps"] for s in made["stretches"]] == ["1-3", "4-6"]
    assert made["seconds_timed"] == pytest.approx(sum(s["seconds"] for s in made["stretches"]))
    assert made["command"].startswith(f"vllm-duo calibrate {tiny2} --out {tmp_path / 'resumed'}")
    assert " --steps 6 " in made["command"] and "--resume" not in made["command"]
    assert " --sink 4 " in made["command"] and "--reg" not in made["command"]  # defaults left out

    # A resumed run must keep the settings that define the optimisation.
    with pytest.raises(DuoConfigError, match=r"--lr=0\.1 but this run has --lr=0\.2"):
        calibrate(_config(tiny2, tmp_path / "resumed", steps=8, resume=True, lr=0.2))
    with pytest.raises(DuoConfigError, match="pass --resume"):
        calibrate(_config(tiny2, tmp_path / "resumed", steps=8))
    with pytest.raises(DuoConfigError, match="--steps=4 is below the 6 steps"):
        calibrate(_config(tiny2, tmp_path / "resumed", steps=4, resume=True))


def test_command_line_writes_home_as_tilde_and_quotes_the_rest():
    config = CalibrationConfig(
        model=Path.home() / "models" / "m", out=Path("/tmp/a b"), steps=7, model_id="org/m"
    )
    assert config.command() == (
        "vllm-duo calibrate ~/models/m --out '/tmp/a b' --steps 7 --model-id org/m"
    )


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"steps": 0}, "--steps=0"),
        ({"steps": -3}, "--steps=-3"),
        ({"min_len": 200, "max_len": 150}, "--min-len=200 is larger than --max-len=150"),
        ({"lr": 0.0}, "--lr=0.0"),
        ({"lr": -1.0}, "--lr=-1.0"),
        ({"lr": float("nan")}, "--lr=nan"),
        ({"reg": -0.1}, "--reg=-0.1"),
        ({"sink": -1}, "--sink=-1"),
        ({"recent": 0}, "--recent=0"),
        ({"batch_size": 0}, "--batch-size=0"),
        ({"min_len": 10, "max_len": 20}, "--max-len=20 must exceed --sink + --recent"),
        ({"device": "tpu"}, "--device='tpu'"),
        ({"dtype": "int8"}, "--dtype='int8'"),
    ],
)
def test_bad_values_name_the_flag(tmp_path, overrides, flag):
    with pytest.raises(DuoConfigError) as info:
        _config(tmp_path, tmp_path / "out", **overrides)
    assert flag in str(info.value)


def test_bad_paths_name_the_argument(tiny2, tmp_path):
    with pytest.raises(DuoConfigError, match=r"MODEL_DIR '.*missing' does not exist"):
        calibrate(_config(tmp_path / "missing", tmp_path / "out"))
    with pytest.raises(DuoConfigError, match="not a Hugging Face model directory"):
        calibrate(_config(tmp_path, tmp_path / "out"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DuoConfigError, match=r"--out='.*file\.txt' exists and is not a directory"):
        calibrate(_config(tiny2, a_file))
    with pytest.raises(DuoConfigError, match="--resume: there is no checkpoint"):
        calibrate(_config(tiny2, tmp_path / "fresh", resume=True))
    with pytest.raises(DuoConfigError, match="--min-len=30 is too short"):
        calibrate(_config(tiny2, tmp_path / "out", min_len=30))
    with pytest.raises(DuoConfigError, match="--max-len=9000 exceeds the model's max_position"):
        calibrate(_config(tiny2, tmp_path / "out", max_len=9000))
    if not torch.cuda.is_available():
        with pytest.raises(DuoConfigError, match="--device=cuda: CUDA is not available"):
            calibrate(_config(tiny2, tmp_path / "out", device="cuda"))


# --------------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------------


def test_attention_mass_writes_a_ranked_pattern(tiny2, tmp_path, capsys):
    out = tmp_path / "mass"
    argv = ["calibrate", str(tiny2), "--out", str(out), "--method", "attention-mass",
            "--steps", "2", "--sink", "4", "--recent", "16", "--min-len", "96",
            "--max-len", "128", "--passkeys", "1"]  # fmt: skip
    assert main(argv) == 0
    gates = load_gates(out)
    assert gates.shape == (2, 2) and gates.max() == pytest.approx(1.0) and gates.min() >= 0
    record = json.loads((out / "config.json").read_text())
    assert record["supervision"] == "attention-mass" and record["haystack"] == "python-reference"
    meta = json.loads((out / "model.json").read_text())
    assert "far attention mass" in meta["source"]
    assert meta["calibration"]["prompts"] == meta["calibration"]["prompts_timed"] == 2
    assert "--method attention-mass" in meta["calibration"]["command"]
    assert not (out / CHECKPOINT_FILE).exists()


def test_cli_writes_a_loadable_pattern(tiny2, tmp_path, capsys):
    out = tmp_path / "pattern"
    argv = ["calibrate", str(tiny2), "--out", str(out), "--steps", "2", "--sink", "4"]
    argv += ["--recent", "16", "--min-len", "96", "--max-len", "128", "--passkeys", "1"]
    assert main([*argv, "--model-id", "tests/tiny2"]) == 0
    captured = capsys.readouterr()
    assert f"pattern written to {out}" in captured.out
    # The library's progress log reaches stderr while the command runs, and only then.
    log = [line for line in captured.err.splitlines() if line.startswith("INFO ")]
    assert any(line.endswith(f"pattern written to {out}") for line in log), captured.err
    assert not logging.getLogger("vllm_duo").handlers

    gates = load_gates(out)
    assert gates.shape == (2, 2) and ((gates >= 0) & (gates <= 1)).all()
    rows = (out / GATES_FILE).read_text().splitlines()
    assert len(rows) == 2 and all(len(row.split("\t")) == 2 for row in rows)
    meta = json.loads((out / "model.json").read_text())
    assert meta["model_ids"] == ["tests/tiny2"]
    assert meta["shape"] == {
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "head_size": HEAD_DIM,
    }
    assert meta["recommended_sparsity"] == 0.5 and "vllm-duo calibrate" in meta["source"]
    record = json.loads((out / "config.json").read_text())
    assert record["sink_size"] == 4 and record["recent_size"] == 16 and record["num_steps"] == 2
    duo = record["vllm_duo"]
    assert duo["settings"]["max_len"] == 128 and duo["steps_done"] == 2
    assert duo["final_loss"] > 0 and set(duo["versions"]) >= {"torch", "transformers", "vllm_duo"}
    assert duo["tokenizer"]["chat_template_used"] is True

    # The pattern is usable by `patterns show`.
    assert main(["patterns", "show", str(out), "--sparsity", "0.5"]) == 0

    # Bad input: one error line, exit 2.
    assert main([*argv, "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vllm-duo: error: --steps=0")
