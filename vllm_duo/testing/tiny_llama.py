"""Build a tiny random-weight Llama checkpoint (model + tokenizer) entirely offline.

The checkpoint is an ordinary Hugging Face directory (``LlamaForCausalLM`` safetensors, a byte-level
BPE ``tokenizer.json`` trained on a built-in corpus, a ChatML chat template) so that vLLM can serve
it exactly like a real model. Weights are drawn from a seeded generator, parameter by parameter,
so they do not depend on transformers' initialisation code; the query/key projections get a large
standard deviation so attention is sharply peaked and full attention is easy to tell apart from
sink+window (streaming) attention in tests.

This module must not import vllm.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vllm_duo.default_model import build_lock, make_readable, publish_directory

logger = logging.getLogger(__name__)

# Bump when the recipe (corpus, init, files written) changes so cached builds are rebuilt.
FORMAT_VERSION = 1
MARKER_FILENAME = "tiny_llama.json"

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
IM_START_TOKEN, IM_END_TOKEN = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
"""Special tokens occupy ids ``[0, NUM_SPECIAL_TOKENS)``; ordinary tokens follow."""

# Byte-level BPE needs all 256 byte symbols to round-trip arbitrary text.
MIN_VOCAB_SIZE = NUM_SPECIAL_TOKENS + 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML-like template; the tokenizer does not add BOS inside chat (vLLM tokenizes the rendered
chat without special tokens), so the template emits it."""

_DTYPES = ("float32", "bfloat16", "float16")

_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from it an be this are or which "
    "have has had not but all were when we there can more one their if will would about "
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "number night point home water room mother area money story fact month lot right study "
    "book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war history "
    "party result change morning reason research girl guy moment air teacher force education "
    "passkey pass key remember number hidden secret grass sky sun blue green yellow red here "
    "there go stay again what where who how why answer question capital France Paris city "
    "def return class import print self None True False if else elif for while in range len"
)
_WORDS = tuple(_WORDS_TEXT.split())

_PUNCTUATION = (".", ",", "!", "?", ";", ":", " -", " (", ")", '"', "'")


def _byte_level_alphabet() -> dict[int, str]:
    """Return GPT-2's byte -> printable-character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _non_ascii_byte_ids() -> frozenset[int]:
    """Ids of the single-byte tokens for bytes >= 0x80 in a tiny-llama tokenizer.

    The BPE trainer places the 256 byte symbols right after the special tokens, sorted by
    character; ``_build_tokenizer`` checks that layout. A lone such byte is not valid UTF-8, and
    vLLM's incremental detokenizer then emits confusing text, so synthetic prompts avoid them.
    """
    alphabet = _byte_level_alphabet()
    order = sorted(alphabet.values())
    return frozenset(
        NUM_SPECIAL_TOKENS + order.index(char) for byte, char in alphabet.items() if byte >= 0x80
    )


NON_ASCII_BYTE_IDS = _non_ascii_byte_ids()


def _corpus(seed: int = 1234, n_lines: int = 4000) -> Iterator[str]:
    """Yield a deterministic training corpus: sentences, numbers, code-ish and odd lines.

    The corpus is independent of the model seed so that every tiny model shares a tokenizer
    recipe; only ``vocab_size`` changes how many merges are learned.
    """
    rng = random.Random(seed)
    printable = "".join(chr(c) for c in range(32, 127))
    yield printable
    for i in range(n_lines):
        kind = i % 5
        if kind == 4:
            # Numbers and passkey-like lines, so digits merge into common chunks.
            yield (
                f"The pass key is {rng.randrange(10**6)}. Remember it. "
                f"{rng.randrange(100)} + {rng.randrange(100)} = {rng.randrange(200)}"
            )
        elif kind == 3:
            name = rng.choice(_WORDS)
            yield f"def {name}_{i}(x, y):\n    return x * {rng.randrange(10)} + y  # {name}"
        else:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
            sentence = words[0].capitalize() + " " + " ".join(words[1:])
            if rng.random() < 0.3:
                sentence += rng.choice(_PUNCTUATION) + " " + rng.choice(_WORDS)
            yield sentence + rng.choice((".", "!", "?", "\n"))


def _build_tokenizer(vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # Llama-style: plain encodes start with BOS (chat rendering adds it through the template).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    # A large vocab_size can exceed what the corpus yields in merges; pad with inert tokens so
    # every id the model can emit decodes to something.
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_tokens(
            [AddedToken(f"<|extra_{i}|>", normalized=False) for i in range(missing)]
        )
    got = tokenizer.get_vocab_size()
    if got != vocab_size:
        raise RuntimeError(f"tokenizer has {got} ids, expected {vocab_size}")
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise RuntimeError(f"special token {token} did not get id {token_id}")
    # synthetic_prompt_ids relies on this layout of the byte symbols.
    for index, char in enumerate(sorted(_byte_level_alphabet().values())):
        if tokenizer.token_to_id(char) != NUM_SPECIAL_TOKENS + index:
            raise RuntimeError(f"unexpected id for byte symbol {char!r}")
    return tokenizer


def _init_weights(model: Any, seed: int, hidden_size: int) -> None:
    """Overwrite every parameter from a seeded generator (in name order, for determinism)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    fan_in_std = hidden_size**-0.5
    # q/k: 0.2 at the default hidden size 128, scaled so the attention-logit spread (~5) stays
    # similar for other sizes; peaked attention makes streaming vs full attention visible.
    qk_std = 0.2 * (128 / hidden_size) ** 0.5
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or "layernorm" in name:
                # Mild jitter around 1 so norms are not exactly the identity.
                std, mean = 0.1, 1.0
            elif "q_proj" in name or "k_proj" in name:
                std, mean = qk_std, 0.0
            elif "embed_tokens" in name:
                std, mean = 1.0, 0.0
            elif "lm_head" in name:
                # Logits with a spread of a few nats: informative but not one-hot log-probs.
                std, mean = 2.0 * fan_in_std, 0.0
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else hidden_size
                std, mean = fan_in**-0.5, 0.0
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std + mean
            param.copy_(values.to(param.dtype))


def _build_args(**kwargs: Any) -> dict[str, Any]:
    """Normalise the builder arguments into the JSON-able dict stored in the marker."""
    args = dict(kwargs)
    if args["hidden_size"] is None:
        args["hidden_size"] = args["num_heads"] * args["head_dim"]
    if args["sliding_layers"] is not None:
        args["sliding_layers"] = sorted({int(i) for i in args["sliding_layers"]})
    return args


def _validate(args: dict[str, Any]) -> None:
    """Raise ValueError for argument combinations that cannot make a valid model."""
    if args["num_heads"] % args["num_kv_heads"]:
        raise ValueError(
            f"num_heads={args['num_heads']} must be a multiple of num_kv_heads="
            f"{args['num_kv_heads']}"
        )
    if args["vocab_size"] < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE}, got {args['vocab_size']}")
    if args["dtype"] not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {args['dtype']!r}")
    if args["sliding_window"] is not None and args["sliding_window"] < 1:
        raise ValueError(f"sliding_window must be a positive int, got {args['sliding_window']}")
    layers = args["sliding_layers"]
    if layers is not None:
        if args["sliding_window"] is None:
            raise ValueError("sliding_layers needs sliding_window")
        if any(i < 0 or i >= args["num_layers"] for i in layers):
            raise ValueError(f"sliding_layers {layers} out of range [0, {args['num_layers']})")


def _read_marker(path: Path) -> dict[str, Any] | None:
    """Return the marker json of a built model directory, or None."""
    try:
        return json.loads((path / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(out_dir: Path, args: dict[str, Any]) -> None:
    """Write config, weights, tokenizer and generation config into ``out_dir``."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    num_layers = args["num_layers"]
    config_kwargs: dict[str, Any] = {}
    if args["sliding_window"] is not None:
        # vLLM's Llama reads per-layer "layer_types" and the shared "sliding_window";
        # transformers' Llama ignores both (its reference output is full attention).
        sliding = (
            set(range(num_layers))
            if args["sliding_layers"] is None
            else set(args["sliding_layers"])
        )
        config_kwargs["sliding_window"] = args["sliding_window"]
        config_kwargs["layer_types"] = [
            "sliding_attention" if i in sliding else "full_attention" for i in range(num_layers)
        ]
    config = LlamaConfig(
        vocab_size=args["vocab_size"],
        hidden_size=args["hidden_size"],
        intermediate_size=args["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=args["num_heads"],
        num_key_value_heads=args["num_kv_heads"],
        head_dim=args["head_dim"],
        max_position_embeddings=args["max_position_embeddings"],
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        **config_kwargs,
    )
    dtype = getattr(torch, args["dtype"])
    model = LlamaForCausalLM(config)
    _init_weights(model, args["seed"], args["hidden_size"])
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir)

    # Chat replies end with <|im_end|>; plain completions with </s>.
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID
    ).save_pretrained(out_dir)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(args["vocab_size"]),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=args["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its backend class name; the alias PreTrainedTokenizerFast also loads
    # with transformers 4.x.
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n", "utf-8")


def build_tiny_llama(
    out_dir: str | Path,
    *,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden_size: int | None = None,
    intermediate_size: int = 64,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: str = "float32",
    sliding_window: int | None = None,
    sliding_layers: Sequence[int] | None = None,
) -> Path:
    """Write (or reuse) a tiny random-weight ``LlamaForCausalLM`` checkpoint at ``out_dir``.

    Args:
        out_dir: target directory. If it already holds a build with the same arguments it is
            returned as is; a build with other arguments is replaced; a non-empty directory that
            is not a tiny-llama build raises ``FileExistsError``.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: KV heads (GQA when smaller than ``num_heads``).
        head_dim: per-head dimension (vLLM CPU supports 32, 64, 80, 96, 112, 128, ...).
        hidden_size: model width; defaults to ``num_heads * head_dim``.
        intermediate_size: MLP width.
        vocab_size: embedding rows and tokenizer size (>= ``MIN_VOCAB_SIZE``).
        max_position_embeddings: maximum context length in the config.
        seed: weight seed; the same arguments always give the same weights.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        sliding_window: if set, mark layers as vLLM sliding-window layers of this size (used by
            vLLM only; transformers' Llama ignores it).
        sliding_layers: which layers slide (default: all); needs ``sliding_window``.

    Returns:
        The checkpoint directory.
    """
    out_dir = Path(out_dir).expanduser()
    args = _build_args(
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        dtype=dtype,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
    )
    _validate(args)
    marker = {"format_version": FORMAT_VERSION, "args": args}

    if _read_marker(out_dir) == marker:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out_dir.parent / f".{out_dir.name}.lock"):
        existing = _read_marker(out_dir)
        if existing == marker:
            return out_dir
        # Never delete a directory we did not build.
        if existing is None and out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists, is not empty and is not a tiny-llama build")
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            _write(tmp_dir, args)
            (tmp_dir / MARKER_FILENAME).write_text(
                json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            make_readable(tmp_dir)
            try:
                publish_directory(tmp_dir, out_dir)
            except FileExistsError:
                if _read_marker(out_dir) != marker:
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("Built tiny Llama %s at %s", args, out_dir)
    return out_dir


def synthetic_prompt_ids(
    n_tokens: int,
    seed: int,
    vocab_size: int,
    *,
    add_bos: bool = False,
    min_id: int = NUM_SPECIAL_TOKENS,
) -> list[int]:
    """Return ``n_tokens`` deterministic random token ids that avoid the special ids.

    Ids are drawn uniformly from ``[min_id, vocab_size)`` minus ``NON_ASCII_BYTE_IDS`` (lone
    bytes >= 0x80 of the tiny-llama tokenizer), so the prompt decodes to valid UTF-8.

    Args:
        n_tokens: prompt length (including the BOS when ``add_bos``).
        seed: RNG seed; equal arguments give equal prompts on every platform.
        vocab_size: exclusive upper bound of the ids.
        add_bos: make the first token ``BOS_ID``.
        min_id: smallest id allowed (raise it for other tokenizers with more special tokens).
    """
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    allowed = [i for i in range(min_id, vocab_size) if i not in NON_ASCII_BYTE_IDS]
    if not allowed:
        raise ValueError(f"no token ids available in [{min_id}, {vocab_size})")
    # random.Random's stream for a given int seed is stable across Python versions and platforms.
    rng = random.Random(seed)
    ids = [allowed[rng.randrange(len(allowed))] for _ in range(n_tokens)]
    if add_bos and ids:
        ids[0] = BOS_ID
    return ids
