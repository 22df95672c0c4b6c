"""DuoAttention pattern calibration: learn one gate per (layer, KV head) by distillation.

The model's weights are frozen. Every attention layer mixes, per KV head group,
``alpha * full + (1 - alpha) * streaming`` (:mod:`vllm_duo.calibration.gated_attention`), with
one trainable gate ``alpha`` per (layer, KV head) initialised to 1. Each step draws a batch of
synthetic multi-passkey prompts (:mod:`vllm_duo.calibration.data`), runs the frozen
full-attention model once without gradients (the teacher), runs the gated model (the student)
and minimises

    loss = mean((h_student - h_teacher) ** 2 at the answer positions) + reg * mean(|alpha|)

where ``h`` is the last hidden state (the final norm's output) at the positions that predict
the answer tokens. Gates are clamped to [0, 1] after every optimizer step (Adam, constant
learning rate). Heads whose gates stay high need the whole context: the retrieval heads.

Memory stays bounded for long prompts: gradient checkpointing on the decoder layers keeps one
layer's activations at a time, full attention uses the fused SDPA kernel and streaming
attention is tiled (no T x T tensor anywhere).

The result is a pattern directory in the upstream layout (``full_attention_heads.tsv`` plus a
``config.json`` training record) with a ``model.json`` like the bundled patterns. A checkpoint
(``checkpoint.pt``: gates, optimizer state, step, RNG state, settings) is written every
``save_every`` steps and at the end; ``resume=True`` continues it and reaches the same gates as
an uninterrupted run (the data of a step depends only on the seed and the step number).

Pure module: torch and transformers, never vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_duo.calibration import record as run_record
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import GATES_FILE, MODEL_FILE

__all__ = [
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "CalibrationConfig",
    "calibrate",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = 1
_DTYPES = ("auto", "float32", "bfloat16", "float16")
METHODS = ("gates", "attention-mass")
"""``gates``: DuoAttention's gate distillation; ``attention-mass``: the far-attention baseline."""
_DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]+)?")
# Settings that define the optimisation: a resumed run must use the same values.
_RESUME_KEYS = (
    "sink",
    "recent",
    "lr",
    "reg",
    "min_len",
    "max_len",
    "seed",
    "batch_size",
    "passkeys",
    "dtype",
    "tile",
    "haystack",
    "length_dist",
)


def _flag(field: str) -> str:
    """The command-line flag of a config field (``min_len`` -> ``--min-len``)."""
    return "MODEL_DIR" if field == "model" else "--" + field.replace("_", "-")


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of one calibration run (one field per ``vllm-duo calibrate`` flag).

    Attributes:
        model: local Hugging Face model directory (``MODEL_DIR``).
        out: output pattern directory (``--out``); also holds ``checkpoint.pt``.
        sink: S, sink tokens of a streaming head.
        recent: W, recent tokens of a streaming head.
        steps: optimizer steps in total (a resumed run continues up to this number).
        lr: Adam learning rate of the gates.
        reg: weight of the L1 term ``mean(|alpha|)`` that pushes gates towards streaming.
        min_len, max_len: prompt lengths in tokens, uniform in ``[min_len, max_len]`` per step.
        seed: data seed (prompts, pass keys, lengths).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: prompts per step.
        resume: continue the checkpoint in ``out``.
        passkeys: pass keys hidden per prompt.
        save_every: write the checkpoint every this many steps (and always at the end).
        dtype: model dtype; ``auto`` is float32 on CPU and bfloat16 on CUDA (gates are float32).
        model_id: model id recorded in ``model.json`` (default: the id the model directory
            records, else its name).
        tile: query rows per streaming-attention tile (memory/speed trade-off).
        haystack: the text the pass keys hide in: an offline text source
            (:data:`vllm_duo.evaluation.texts.SOURCES`) or ``"generated"`` filler sentences.
        length_dist: ``uniform`` or ``log-uniform`` prompt lengths in ``[min_len, max_len]``.
        method: ``gates`` (train gates, the paper's optimisation) or ``attention-mass`` (rank
            heads by the attention their answer positions pay to tokens outside sink + window
            on ``steps`` calibration prompts; no training, see
            :mod:`vllm_duo.calibration.attention_mass`).
    """

    model: Path
    out: Path
    sink: int = 64
    recent: int = 256
    steps: int = 500
    lr: float = 0.02
    reg: float = 0.05
    min_len: int = 1024
    max_len: int = 4096
    seed: int = 42
    device: str = "cpu"
    batch_size: int = 1
    resume: bool = False
    passkeys: int = 3
    save_every: int = 25
    dtype: str = "auto"
    model_id: str | None = None
    tile: int = 256
    haystack: str = "python-reference"
    length_dist: str = "uniform"
    method: str = "gates"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model).expanduser())
        object.__setattr__(self, "out", Path(self.out).expanduser())
        minimums = {
            "sink": 0,
            "recent": 1,
            "steps": 1,
            "min_len": 1,
            "max_len": 1,
            "batch_size": 1,
            "passkeys": 1,
            "save_every": 1,
            "tile": 1,
            "seed": 0,
        }
        for field, minimum in minimums.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DuoConfigError(
                    f"{_flag(field)}={value!r} is invalid: expected an integer >= {minimum}."
                )
        for field, allow_zero in (("lr", False), ("reg", True)):
            value = getattr(self, field)
            ok = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = ">= 0" if allow_zero else "> 0"
                raise DuoConfigError(
                    f"{_flag(field)}={value!r} is invalid: expected a finite number {bound}."
                )
        if self.min_len > self.max_len:
            raise DuoConfigError(
                f"--min-len={self.min_len} is larger than --max-len={self.max_len}: prompt "
                f"lengths are drawn from [--min-len, --max-len]."
            )
        if self.max_len <= self.sink + self.recent:
            raise DuoConfigError(
                f"--max-len={self.max_len} must exceed --sink + --recent = "
                f"{self.sink + self.recent}: in shorter prompts streaming and full attention "
                f"are identical, so there is nothing to learn (every gate would fall to 0)."
            )
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise DuoConfigError(
                f"--device={self.device!r} is invalid: expected cpu, cuda or cuda:N."
            )
        if self.dtype not in _DTYPES:
            raise DuoConfigError(
                f"--dtype={self.dtype!r} is invalid: expected one of {', '.join(_DTYPES)}."
            )
        from vllm_duo.calibration.data import GENERATED, LENGTH_DISTS
        from vllm_duo.evaluation.texts import SOURCES

        if self.haystack != GENERATED and self.haystack not in SOURCES:
            raise DuoConfigError(
                f"--haystack={self.haystack!r} is invalid: expected {GENERATED} or a text "
                f"source ({', '.join(SOURCES)})."
            )
        if self.method not in METHODS:
            raise DuoConfigError(
                f"--method={self.method!r} is invalid: expected one of {', '.join(METHODS)}."
            )
        if self.length_dist not in LENGTH_DISTS:
            raise DuoConfigError(
                f"--length-dist={self.length_dist!r} is invalid: expected one of "
                f"{', '.join(LENGTH_DISTS)}."
            )
        if self.model_id is not None and not (
            isinstance(self.model_id, str) and self.model_id.strip()
        ):
            raise DuoConfigError(f"--model-id={self.model_id!r} is empty: give a model id.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (paths as strings), keyed by field name."""
        data = dataclasses.asdict(self)
        data["model"] = str(self.model)
        data["out"] = str(self.out)
        return data

    def command(self) -> str:
        """The ``vllm-duo calibrate`` command line that makes these settings."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return run_record.command_line(self.to_dict(), defaults, flag=_flag)

    def check_paths(self) -> None:
        """Validate the model and output directories (before anything is loaded).

        Raises:
            DuoConfigError: missing model directory or one without ``config.json``, ``--out``
                that is not a directory, a checkpoint in ``--out`` without ``--resume`` or
                ``--resume`` without one.
        """
        if not self.model.exists():
            raise DuoConfigError(
                f"MODEL_DIR '{self.model}' does not exist: pass a local Hugging Face model "
                f"directory (config.json, weights, tokenizer)."
            )
        if not self.model.is_dir() or not (self.model / "config.json").is_file():
            raise DuoConfigError(
                f"MODEL_DIR '{self.model}' is not a Hugging Face model directory (no "
                f"config.json): pass the directory holding config.json, weights and tokenizer."
            )
        if self.out.exists() and not self.out.is_dir():
            raise DuoConfigError(
                f"--out='{self.out}' exists and is not a directory: choose a directory for the "
                f"pattern (it is created if missing)."
            )
        checkpoint = self.out / CHECKPOINT_FILE
        if self.resume and not checkpoint.is_file():
            raise DuoConfigError(
                f"--resume: there is no checkpoint {checkpoint} to continue; drop --resume to "
                f"start a new calibration."
            )
        if not self.resume and checkpoint.exists():
            raise DuoConfigError(
                f"--out='{self.out}' already holds a calibration checkpoint ({CHECKPOINT_FILE}): "
                f"pass --resume to continue it, or choose another --out."
            )


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading bar for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _torch_dtype(config: CalibrationConfig) -> Any:
    import torch

    name = config.dtype
    if name == "auto":
        name = "float32" if config.device == "cpu" else "bfloat16"
    return getattr(torch, name)


def _model_shape(hf_config: Any) -> dict[str, int]:
    """num_layers, num_attention_heads, num_kv_heads, head_size of a decoder config."""
    layers = getattr(hf_config, "num_hidden_layers", None)
    heads = getattr(hf_config, "num_attention_heads", None)
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_size = getattr(hf_config, "head_dim", None)
    if head_size is None and heads:
        head_size = hf_config.hidden_size // heads
    shape = {
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_size": head_size,
    }
    if not all(isinstance(v, int) and v > 0 for v in shape.values()):
        raise DuoConfigError(
            f"the model config has no usable decoder shape ({shape}): calibrate supports "
            f"decoder-only transformers models such as Llama, Mistral and Qwen2."
        )
    return shape


def _check_attention_kinds(hf_config: Any, model_dir: Path) -> None:
    """Refuse models whose layers are not all full causal attention."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        raise DuoConfigError(
            f"MODEL_DIR '{model_dir}' has non-full attention layers ({sorted(set(layer_types))}): "
            f"calibrate (like the DUO backend) supports full causal attention only."
        )
    # Without layer_types, a set sliding_window means every layer slides (Mistral v0.1).
    if getattr(hf_config, "use_sliding_window", False) or (
        not layer_types and getattr(hf_config, "sliding_window", None)
    ):
        raise DuoConfigError(
            f"MODEL_DIR '{model_dir}' uses sliding-window attention: calibrate (like the DUO "
            f"backend) supports full causal attention only."
        )


def _default_model_id(model_dir: Path) -> str:
    """The id a converted checkpoint records (vllm-duo's marker), else the directory name."""
    marker = model_dir / "duo_prepared.json"
    try:
        model = json.loads(marker.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        model = None
    return model if isinstance(model, str) and model else model_dir.resolve().name


def _load_tokenizer(config: CalibrationConfig) -> tuple[Any, dict[str, int]]:
    """The tokenizer and the decoder shape, after checking the model config (cheap)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise DuoConfigError(
            f"--device={config.device}: CUDA is not available in this PyTorch build or machine; "
            f"use --device cpu."
        )
    with _quiet_transformers():
        try:
            hf_config = AutoConfig.from_pretrained(config.model, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise DuoConfigError(
                f"MODEL_DIR '{config.model}' cannot be loaded offline by transformers "
                f"({type(exc).__name__}: {first_line})."
            ) from None
    shape = _model_shape(hf_config)
    _check_attention_kinds(hf_config, config.model)
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and config.max_len > max_positions:
        raise DuoConfigError(
            f"--max-len={config.max_len} exceeds the model's max_position_embeddings "
            f"({max_positions}); lower --max-len."
        )
    return tokenizer, shape


def _load_model(config: CalibrationConfig) -> Any:
    """The frozen decoder (the base model, no LM head) with the gated attention hook."""
    import torch
    from transformers import AutoModel

    from vllm_duo.calibration.gated_attention import register_attention

    with _quiet_transformers():
        model = AutoModel.from_pretrained(
            config.model,
            local_files_only=True,
            dtype=_torch_dtype(config),
            attn_implementation=register_attention(),
        )
    model.to(config.device)
    model.requires_grad_(False)
    # The student runs in training mode (gradient checkpointing needs it): make that
    # deterministic and identical to the teacher by switching every dropout off.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Only the gates need gradients; the embedding-output hook added for reentrant
    # checkpointing would make backward compute an unused input gradient.
    if hasattr(model, "disable_input_require_grads"):
        with contextlib.suppress(Exception):
            model.disable_input_require_grads()
    return model


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state(device: str) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def _set_rng_state(state: dict[str, Any], device: str) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.startswith("cuda") and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def _save_checkpoint(
    path: Path,
    *,
    gates: Any,
    optimizer: Any,
    step: int,
    losses: list[float],
    stretches: list[dict[str, Any]],
    config: CalibrationConfig,
) -> None:
    """Write the checkpoint atomically (temporary file + rename)."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "gates": gates.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(config.device),
        "losses": list(losses),
        "stretches": stretches,
        "args": config.to_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, config: CalibrationConfig) -> dict[str, Any]:
    """Read and check a checkpoint against this run's settings."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DuoConfigError(
            f"--resume: checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); remove "
            f"it to start over."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DuoConfigError(
            f"--resume: {path} is not a vllm-duo calibration checkpoint (format "
            f"{CHECKPOINT_FORMAT}); remove it to start over."
        )
    saved = payload["args"]
    for key in _RESUME_KEYS:
        if saved.get(key) != getattr(config, key):
            raise DuoConfigError(
                f"--resume: the checkpoint in {config.out} was made with "
                f"{_flag(key)}={saved.get(key)!r} but this run has {_flag(key)}="
                f"{getattr(config, key)!r}; rerun with the same setting or choose another --out."
            )
    if Path(saved["model"]).resolve() != config.model.resolve():
        raise DuoConfigError(
            f"--resume: the checkpoint in {config.out} was made for MODEL_DIR "
            f"'{saved['model']}', not '{config.model}'; choose another --out."
        )
    if payload["step"] > config.steps:
        raise DuoConfigError(
            f"--steps={config.steps} is below the {payload['step']} steps the checkpoint has "
            f"already done; pass --steps >= {payload['step']}."
        )
    return payload


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from vllm_duo import __version__

    return {
        "vllm_duo": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _write_pattern(
    config: CalibrationConfig,
    *,
    gates: Any,
    shape: dict[str, int],
    tokenizer: Any,
    uses_chat_template: bool,
    steps_done: int,
    losses: list[float],
    seconds_per_step: float | None,
    stretches: list[dict[str, Any]],
) -> None:
    """Write full_attention_heads.tsv, config.json and model.json into ``config.out``."""
    values = gates.detach().float().cpu().tolist()
    rows = ["\t".join(f"{float(g):.9g}" for g in row) for row in values]
    (config.out / GATES_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")

    model_id = config.model_id or _default_model_id(config.model)
    flat = [g for row in values for g in row]
    final_loss = losses[-1] if losses else None
    tail = losses[-10:]
    record = {
        # Keys named as in the upstream DuoAttention training dump, for tools that read it.
        "model_name": str(config.model),
        "dataset_format": "synthetic_multiple_passkey",
        "haystack": config.haystack,
        "length_distribution": config.length_dist,
        "lr": config.lr,
        "num_steps": config.steps,
        "batch_size": config.batch_size,
        "context_length_min": config.min_len,
        "context_length_max": config.max_len,
        "num_passkeys": config.passkeys,
        "sink_size": config.sink,
        "recent_size": config.recent,
        "reg_weight": config.reg,
        "initial_value": 1.0,
        "supervision": "distill" if config.method == "gates" else "attention-mass",
        "seed": config.seed,
        "device": config.device,
        # Everything else.
        "vllm_duo": {
            "tool": "vllm-duo calibrate",
            "settings": config.to_dict(),
            "model_id": model_id,
            "model_dir": str(config.model.resolve()),
            "model_shape": shape,
            "dtype": str(_torch_dtype(config)).removeprefix("torch."),
            "tokenizer": {
                "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
                "class": type(tokenizer).__name__,
                "vocab_size": len(tokenizer),
                "chat_template_used": uses_chat_template,
            },
            "steps_done": steps_done,
            "final_loss": final_loss,
            "final_loss_mean_last_10": sum(tail) / len(tail) if tail else None,
            "gate_mean": sum(flat) / len(flat),
            "gate_fraction_below_0_5": sum(g < 0.5 for g in flat) / len(flat),
            "seconds_per_step": seconds_per_step,
            "created_utc": run_record.utc_now(),
            "versions": _versions(),
        },
    }
    (config.out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    what = (
        "DuoAttention gate distillation"
        if config.method == "gates"
        else "heads ranked by far attention mass at the answer positions (baseline, no training)"
    )
    unit = "steps" if config.method == "gates" else "prompts"
    source = (
        f"vllm-duo calibrate {record['vllm_duo']['versions']['vllm_duo']}: {what} "
        f"on synthetic multi-passkey prompts ({steps_done} {unit}, "
        f"{config.min_len}-{config.max_len} tokens {config.length_dist}, {config.passkeys} pass "
        f"keys in {config.haystack} text, "
        f"sink={config.sink}, recent={config.recent}, lr={config.lr:g}, reg={config.reg:g}, "
        f"seed={config.seed}) on {model_id}"
    )
    meta = {
        "model_ids": [model_id],
        "shape": shape,
        "recommended_sparsity": 0.5,
        "source": source,
        "calibration": run_record.summary(
            command=config.command(), steps=steps_done, unit=unit, stretches=stretches
        ),
    }
    (config.out / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _gate_stats(gates: Any) -> tuple[float, float]:
    """(mean, fraction below 0.5) of the gate table."""
    flat = gates.detach().float().flatten()
    return float(flat.mean()), float((flat < 0.5).float().mean())


def calibrate(config: CalibrationConfig, *, progress: bool = False) -> Path:
    """Run (or resume) a calibration and write the pattern directory.

    Args:
        config: the run's settings.
        progress: show a tqdm progress bar with the loss and gate statistics on stderr.

    Returns:
        ``config.out``, holding ``full_attention_heads.tsv``, ``config.json``, ``model.json``
        and ``checkpoint.pt``.

    Raises:
        DuoConfigError: bad paths, a model that cannot be loaded or is not supported, an
            incompatible checkpoint; every message names the flag to change.
    """
    config.check_paths()

    import torch
    from tqdm.auto import tqdm

    from vllm_duo.calibration.data import PasskeyDataset
    from vllm_duo.calibration.gated_attention import GateHolder, attach_gates

    tokenizer, shape = _load_tokenizer(config)
    dataset = PasskeyDataset(
        tokenizer,
        min_len=config.min_len,
        max_len=config.max_len,
        num_passkeys=config.passkeys,
        seed=config.seed,
        haystack=config.haystack,
        length_dist=config.length_dist,
    )
    if config.method == "attention-mass":
        return _attention_mass(config, tokenizer, shape, dataset, progress)
    checkpoint_path = config.out / CHECKPOINT_FILE
    payload = _load_checkpoint(checkpoint_path, config) if config.resume else None
    table = (shape["num_layers"], shape["num_kv_heads"])
    if payload is not None and tuple(payload["gates"].shape) != table:
        raise DuoConfigError(
            f"--resume: the checkpoint's gate table is {tuple(payload['gates'].shape)} but "
            f"the model has {table} (layers x KV heads); choose another --out."
        )

    model = _load_model(config)
    device = torch.device(config.device)
    gates = torch.ones(table, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([gates], lr=config.lr)
    holder = GateHolder(gates=gates, sink=config.sink, recent=config.recent, tile=config.tile)
    attach_gates(model, holder)

    start = 0
    losses: list[float] = []
    stretches: list[dict[str, Any]] = []
    if payload is not None:
        with torch.no_grad():
            gates.copy_(payload["gates"].to(device))
        optimizer.load_state_dict(payload["optimizer"])
        _set_rng_state(payload["rng"], config.device)
        start = int(payload["step"])
        losses = [float(x) for x in payload["losses"]]
        # Checkpoints from before the time record have none: their steps count as untimed.
        stretches = list(payload.get("stretches", []))
        logger.info("resuming %s at step %d of %d", checkpoint_path, start, config.steps)
    config.out.mkdir(parents=True, exist_ok=True)

    logger.info(
        "calibrating %s: %d layers x %d KV heads, steps %d..%d, prompts %d-%d tokens, "
        "S=%d W=%d, device %s",
        config.model,
        shape["num_layers"],
        shape["num_kv_heads"],
        start,
        config.steps,
        config.min_len,
        config.max_len,
        config.sink,
        config.recent,
        config.device,
    )
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not progress,
        desc="calibrate",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    stretch = run_record.new_stretch(start)
    stretches.append(stretch)
    began = time.perf_counter()
    # The steps since the last checkpoint start here in the stretch's times (for the log:
    # cost grows with length).
    logged = 0
    try:
        for step in range(start, config.steps):
            step_began = time.perf_counter()
            batch = dataset.batch(step, config.batch_size)
            ids = torch.tensor([s.input_ids for s in batch], dtype=torch.long, device=device)
            rows = torch.tensor(
                [b for b, s in enumerate(batch) for _ in s.loss_positions], device=device
            )
            cols = torch.tensor([p for s in batch for p in s.loss_positions], device=device)

            model.eval()
            with torch.no_grad(), holder.teacher():
                target = model(input_ids=ids, use_cache=False).last_hidden_state[rows, cols]
            model.train()
            hidden = model(input_ids=ids, use_cache=False).last_hidden_state[rows, cols]
            distill = torch.nn.functional.mse_loss(hidden.float(), target.float())
            loss = distill + config.reg * gates.abs().mean()

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)

            losses.append(float(loss.detach()))
            seconds = round(time.perf_counter() - step_began, 3)
            stretch["step_seconds"].append([ids.shape[1], seconds])
            distill_value = float(distill.detach())
            done = step + 1
            mean, below = _gate_stats(gates)
            bar.set_postfix(
                loss=f"{losses[-1]:.4g}",
                distill=f"{distill_value:.3g}",
                mean=f"{mean:.3f}",
                lt_half=f"{below:.2f}",
                T=ids.shape[1],
                refresh=False,
            )
            bar.update(1)
            if done % config.save_every == 0 or done == config.steps:
                _save_checkpoint(
                    checkpoint_path,
                    gates=gates,
                    optimizer=optimizer,
                    step=done,
                    losses=losses,
                    stretches=stretches,
                    config=config,
                )
                logger.info(
                    "step %d/%d loss %.5g (distill %.4g) gate mean %.3f, %.0f%% below 0.5; "
                    "checkpoint saved; last %d steps: %s",
                    done,
                    config.steps,
                    losses[-1],
                    distill_value,
                    mean,
                    100 * below,
                    len(stretch["step_seconds"]) - logged,
                    ", ".join(f"{n} tok {s:.1f} s" for n, s in stretch["step_seconds"][logged:]),
                )
                logged = len(stretch["step_seconds"])
    finally:
        bar.close()
    trained = config.steps - start
    seconds_per_step = (time.perf_counter() - began) / trained if trained else None

    if trained == 0:
        logger.info("checkpoint already at step %d: writing the pattern only", start)
    _write_pattern(
        config,
        gates=gates,
        shape=shape,
        tokenizer=tokenizer,
        uses_chat_template=dataset.uses_chat_template,
        steps_done=config.steps,
        losses=losses,
        seconds_per_step=seconds_per_step,
        stretches=stretches,
    )
    logger.info("pattern written to %s", config.out)
    return config.out


def _attention_mass(
    config: CalibrationConfig, tokenizer: Any, shape: dict[str, int], dataset: Any, progress: bool
) -> Path:
    """``--method attention-mass``: score heads on ``steps`` prompts and write the pattern."""
    from vllm_duo.calibration.attention_mass import score_heads

    config.out.mkdir(parents=True, exist_ok=True)
    stretch = run_record.new_stretch(0)
    began = time.perf_counter()
    with _quiet_transformers():
        gates = score_heads(config.model, dataset, prompts=config.steps, sink=config.sink,
                            recent=config.recent, shape=shape, dtype=_torch_dtype(config),
                            device=config.device, progress=progress,
                            step_seconds=stretch["step_seconds"])  # fmt: skip
    _write_pattern(
        config,
        gates=gates,
        shape=shape,
        tokenizer=tokenizer,
        uses_chat_template=dataset.uses_chat_template,
        steps_done=config.steps,
        losses=[],
        seconds_per_step=(time.perf_counter() - began) / config.steps,
        stretches=[stretch],
    )
    logger.info("attention-mass pattern written to %s", config.out)
    return config.out
