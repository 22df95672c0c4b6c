"""DuoAttention head patterns: loading, validation, head selection and bundled patterns.

A *pattern* is one gate value per (decoder layer, KV head), learned offline by DuoAttention's
optimisation. High gates mark *retrieval* heads (full attention over the whole context); the
others become *streaming* heads (attention sinks + recent window only).

Pure module: numpy and the standard library only, never vLLM, so it can be used by the command
line, the tests and the kernels' reference code without starting an engine.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_duo.errors import DuoConfigError
from vllm_duo.settings import DECIMAL_RE

__all__ = [
    "GATES_FILE",
    "MAX_PATTERN_BYTES",
    "BundledPattern",
    "HeadPlan",
    "bundled_patterns_dir",
    "check_shape",
    "list_bundled",
    "load_gates",
    "render_png",
    "resolve_pattern",
    "select_retrieval",
]

logger = logging.getLogger(__name__)

GATES_FILE = "full_attention_heads.tsv"
MODEL_FILE = "model.json"
# A 1000-layer x 1000-head pattern is ~25 MB of text at upstream precision; real ones are
# a few KiB. The cap keeps a wrong path (a checkpoint shard, say) from being read into memory.
MAX_PATTERN_BYTES = 16 * 1024 * 1024

_ENV_PATTERN = "VLLM_DUO_PATTERN"
_PATTERN_HINT = (
    f"set {_ENV_PATTERN} to a bundled pattern name (`vllm-duo patterns list`) or to a directory "
    f"containing {GATES_FILE} (`vllm-duo calibrate` makes one)"
)
# Rows end at \n, \r\n or \r only (as upstream's reader): str.splitlines() would also split a
# line at form feeds, \x1c-\x1e, NEL or U+2028 and silently add layers.
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")


def _os_reason(exc: BaseException) -> str:
    """Short one-line reason of a filesystem error ("File name too long")."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _gates_file(path: Path) -> Path:
    """Map a pattern directory or TSV path to the TSV file, with clear errors."""
    if not path.exists():
        raise DuoConfigError(
            f"pattern path '{path}' does not exist: expected a pattern directory containing "
            f"{GATES_FILE} or the .tsv file itself; check the path."
        )
    if path.is_dir():
        tsv = path / GATES_FILE
        if not tsv.is_file():
            raise DuoConfigError(
                f"pattern directory '{path}' has no {GATES_FILE}: a pattern directory holds "
                f"{GATES_FILE} (tab-separated gates, one row per layer, one column per KV head); "
                f"point at such a directory."
            )
        return tsv
    if not path.is_file():
        raise DuoConfigError(
            f"pattern path '{path}' is neither a directory nor a regular file: expected a pattern "
            f"directory containing {GATES_FILE} or the .tsv file itself."
        )
    return path


def _parse_cell(tsv: Path, row: int, col: int, text: str) -> float:
    cell = text.strip()  # str.strip: float() alone keeps \x1c-\x1f, which rstrip drops at ends
    try:
        value = float(cell)
        # Spelled-out nan/inf pass on to the "not finite" error below.
        # Only ASCII decimals, as numpy.loadtxt (upstream's reader): float() alone would take
        # "0_5" (= 5, clipped to a gate of 1) or non-ASCII digits, a silently different pattern.
        if math.isfinite(value) and not DECIMAL_RE.fullmatch(cell):
            raise ValueError(text)
    except ValueError:
        hint = ""
        if text.strip() and len(text.split()) > 1:
            # The most likely cause: a file saved with spaces instead of tabs.
            hint = " (cells must be separated by tabs, not spaces)"
        raise DuoConfigError(
            f"pattern file '{tsv}' row {row} column {col}: {text!r} is not a number{hint}: "
            f"every cell must be a gate value (a float, ideally in [0, 1])."
        ) from None
    if not math.isfinite(value):
        raise DuoConfigError(
            f"pattern file '{tsv}' row {row} column {col}: {text!r} is not finite: every cell "
            f"must be a finite gate value (a float, ideally in [0, 1]); regenerate the pattern."
        )
    return value


def load_gates(path: str | os.PathLike[str]) -> np.ndarray:
    """Read the gate matrix of a pattern.

    ``path`` is a pattern directory (upstream layout: ``full_attention_heads.tsv`` plus an
    optional ``config.json``, which is not read here) or the TSV file itself. The TSV has one
    row per decoder layer (rows end at \\n, \\r\\n or \\r) and one tab-separated ASCII decimal
    float per KV head; whitespace around a cell and blank lines at the end of the file are
    accepted.

    Returns a new read-only float64 array of shape (layers, KV heads), clipped to [0, 1]
    (published patterns contain tiny negatives such as -1e-3, which upstream clips too).

    Raises:
        DuoConfigError: missing or unreadable path, directory without the TSV, file over
            16 MiB, not UTF-8, empty, blank line inside the data, ragged rows, a non-numeric or
            non-finite cell.
    """
    try:
        tsv = _gates_file(Path(path))
        size = tsv.stat().st_size
    except OSError as exc:  # a name too long, a directory we may not search, ...
        raise DuoConfigError(
            f"pattern path '{path}' cannot be accessed ({_os_reason(exc)}): expected a readable "
            f"pattern directory containing {GATES_FILE} or the .tsv file itself; check the path."
        ) from None
    # Refuse before reading: a wrong path could point at a multi-GB weight file.
    if size > MAX_PATTERN_BYTES:
        raise DuoConfigError(
            f"pattern file '{tsv}' is {size} bytes, larger than the {MAX_PATTERN_BYTES}-byte "
            f"(16 MiB) limit for a gate table: check that the path points at a DuoAttention "
            f"pattern ({GATES_FILE})."
        )
    try:
        data = tsv.read_bytes()
    except OSError as exc:  # no read permission, a file that vanished, ...
        raise DuoConfigError(
            f"pattern file '{tsv}' cannot be read ({_os_reason(exc)}): expected a readable "
            f"{GATES_FILE}; check its permissions."
        ) from None
    try:
        # utf-8-sig: tolerate a byte-order mark written by some editors.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DuoConfigError(
            f"pattern file '{tsv}' is not UTF-8 text (byte {exc.start}): expected tab-separated "
            f"floats; check that the path points at a DuoAttention pattern ({GATES_FILE})."
        ) from None

    lines = [line.rstrip() for line in _LINE_BREAK_RE.split(text)]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DuoConfigError(
            f"pattern file '{tsv}' is empty: expected one row of tab-separated gate values per "
            f"decoder layer; regenerate or re-copy the pattern."
        )

    rows: list[list[float]] = []
    width = 0
    for row_no, line in enumerate(lines, start=1):
        if not line:
            raise DuoConfigError(
                f"pattern file '{tsv}' row {row_no} is blank: blank lines are only allowed at the "
                f"end of the file; remove it."
            )
        cells = line.split("\t")
        if row_no == 1:
            width = len(cells)
        elif len(cells) != width:
            raise DuoConfigError(
                f"pattern file '{tsv}' row {row_no} has {len(cells)} columns but row 1 has "
                f"{width}: every row (decoder layer) needs one gate per KV head; fix or "
                f"regenerate the file."
            )
        rows.append([_parse_cell(tsv, row_no, col, cell) for col, cell in enumerate(cells, 1)])

    gates = np.clip(np.array(rows, dtype=np.float64), 0.0, 1.0)
    gates.setflags(write=False)
    return gates


def check_shape(gates: np.ndarray, num_layers: int, num_kv_heads: int, source: str) -> None:
    """Raise DuoConfigError unless ``gates`` is (num_layers, num_kv_heads).

    ``source`` names where the pattern came from (bundled name or path) for the message.
    """
    shape = tuple(np.shape(gates))
    if shape == (num_layers, num_kv_heads):
        return
    got = "x".join(str(n) for n in shape) if shape else "a scalar"
    raise DuoConfigError(
        f"pattern {source} has shape {got} (layers x KV heads) but the model has "
        f"{num_layers}x{num_kv_heads}: a pattern only fits the model it was made for; "
        f"{_PATTERN_HINT}."
    )


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DuoConfigError(f"{name}={value!r} is not a number: expected a float in [0, 1].")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise DuoConfigError(f"{name}={value!r} is out of range: expected a float in [0, 1].")
    return number


def select_retrieval(
    gates: np.ndarray | Sequence[Sequence[float]],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Choose the retrieval heads of a gate matrix.

    Exactly one of the keywords must be given:

    - ``threshold=t``: a head is a retrieval head iff its clipped gate is >= t.
    - ``sparsity=s``: ``k = N - round(s * N)`` retrieval heads, N = layers x KV heads, chosen as
      the k largest clipped gates over the **whole** matrix (a layer may get 0..H of them).
      ``round`` is Python's round-half-to-even ("banker's rounding"), so s=0.5 with N=5 gives
      round(2.5) = 2 streaming heads and k = 3. Ties are broken by the lower flat (layer-major)
      index, so the result is deterministic and the sets are nested as s grows.

    Gates are clipped to [0, 1] first; the input is never modified.

    Returns:
        A new boolean array of the input's shape, True for retrieval heads.
    """
    if (sparsity is None) == (threshold is None):
        raise DuoConfigError(
            f"select_retrieval needs exactly one of sparsity or threshold, got "
            f"sparsity={sparsity!r} and threshold={threshold!r}."
        )
    values = np.asarray(gates, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise DuoConfigError(
            f"gate matrix has shape {values.shape}: expected a non-empty 2-D array "
            f"(layers x KV heads)."
        )
    if not np.isfinite(values).all():
        layer, head = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise DuoConfigError(
            f"gate matrix has a non-finite value {values[layer, head]!r} at layer {layer}, "
            f"KV head {head}: gates must be finite floats in [0, 1]."
        )
    # np.clip returns a new array, so the caller's array stays untouched.
    clipped = np.clip(values, 0.0, 1.0)

    if threshold is not None:
        t = _check_fraction("threshold", threshold)
        return clipped >= t

    s = _check_fraction("sparsity", sparsity)
    n = clipped.size
    k = n - round(s * n)
    flat = clipped.ravel()  # C order = layer-major flat index
    # lexsort sorts by the last key first and is stable: gate descending, then index ascending.
    order = np.lexsort((np.arange(n), -flat))
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(clipped.shape)


# --------------------------------------------------------------------------------------------
# Head plan
# --------------------------------------------------------------------------------------------


def _run_length(counts: Sequence[int]) -> str:
    """'1,3,8x3,2': runs of 3 or more equal values as VALUExRUN, shorter runs spelled out."""
    parts: list[str] = []
    i = 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        run = j - i
        if run >= 3:
            parts.append(f"{counts[i]}x{run}")
        else:
            parts.extend(str(counts[i]) for _ in range(run))
        i = j
    return ",".join(parts)


@dataclass(frozen=True)
class HeadPlan:
    """Which KV heads of each layer are retrieval heads and which are streaming heads.

    ``retrieval[l]`` and ``streaming[l]`` are ascending KV-head indices of layer ``l``; together
    they partition ``range(num_kv_heads)``. Every layer has the same number of KV heads.
    """

    retrieval: tuple[tuple[int, ...], ...]
    streaming: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.retrieval) != len(self.streaming) or not self.retrieval:
            raise DuoConfigError(
                f"HeadPlan needs the same non-zero number of layers in retrieval and streaming, "
                f"got {len(self.retrieval)} and {len(self.streaming)}."
            )
        width = len(self.retrieval[0]) + len(self.streaming[0])
        if width == 0:
            raise DuoConfigError("HeadPlan layer 0 has no KV heads: expected at least one.")
        for layer, (ret, stream) in enumerate(zip(self.retrieval, self.streaming, strict=True)):
            heads = tuple(ret) + tuple(stream)
            if any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
                raise DuoConfigError(
                    f"HeadPlan layer {layer} has non-integer head indices {heads!r}."
                )
            if sorted(heads) != list(range(width)):
                raise DuoConfigError(
                    f"HeadPlan layer {layer}: retrieval {tuple(ret)} and streaming {tuple(stream)} "
                    f"must partition the KV heads 0..{width - 1}."
                )
            if list(ret) != sorted(ret) or list(stream) != sorted(stream):
                raise DuoConfigError(
                    f"HeadPlan layer {layer}: head indices must be ascending, got retrieval "
                    f"{tuple(ret)} and streaming {tuple(stream)}."
                )

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> HeadPlan:
        """Build a plan from a (layers x KV heads) boolean mask, True = retrieval head."""
        array = np.asarray(mask)
        if array.dtype != np.bool_ or array.ndim != 2 or array.size == 0:
            raise DuoConfigError(
                f"retrieval mask must be a non-empty 2-D boolean array (layers x KV heads), "
                f"got dtype {array.dtype} and shape {array.shape}."
            )
        retrieval = tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in array)
        streaming = tuple(tuple(int(h) for h in np.flatnonzero(~row)) for row in array)
        return cls(retrieval=retrieval, streaming=streaming)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.retrieval)

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer."""
        return len(self.retrieval[0]) + len(self.streaming[0])

    @property
    def num_retrieval(self) -> int:
        """Retrieval heads over all layers."""
        return sum(len(r) for r in self.retrieval)

    @property
    def num_streaming(self) -> int:
        """Streaming heads over all layers."""
        return sum(len(s) for s in self.streaming)

    @property
    def retrieval_fraction(self) -> float:
        """Retrieval heads / all KV heads, in [0, 1]."""
        return self.num_retrieval / (self.num_layers * self.num_kv_heads)

    def counts_per_layer(self) -> tuple[int, ...]:
        """Number of retrieval heads in each layer."""
        return tuple(len(r) for r in self.retrieval)

    def to_mask(self) -> np.ndarray:
        """The (layers x KV heads) boolean mask, True = retrieval head (a new array)."""
        mask = np.zeros((self.num_layers, self.num_kv_heads), dtype=bool)
        for layer, heads in enumerate(self.retrieval):
            mask[layer, list(heads)] = True
        return mask

    def kv_bytes_ratio(self, context_len: int, sink: int, recent: int) -> float:
        """KV cache kept (token x head slots) relative to full attention at ``context_len``.

        A retrieval head keeps all ``context_len`` tokens, a streaming head at most
        ``sink + recent``: ratio = (R + (N - R) * min(L, S + W) / L) / N. This is also the ideal
        decode KV-read ratio, since decode reads exactly what is kept.
        """
        if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
            raise DuoConfigError(f"context_len={context_len!r}: expected an integer >= 1.")
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise DuoConfigError(f"sink={sink!r}: expected an integer >= 0.")
        if isinstance(recent, bool) or not isinstance(recent, int) or recent < 1:
            raise DuoConfigError(f"recent={recent!r}: expected an integer >= 1.")
        total = self.num_layers * self.num_kv_heads
        kept = min(context_len, sink + recent) / context_len
        return (self.num_retrieval + self.num_streaming * kept) / total

    def compact_counts(self) -> str:
        """Retrieval heads per layer as short text for a log line.

        Runs of 3+ layers with the same count are written ``COUNTxLAYERS``: ``"1,3,8x3,2"``
        means layer counts 1, 3, 8, 8, 8, 2.
        """
        return _run_length(self.counts_per_layer())

    def summary(self) -> str:
        """One line: totals, fraction and per-layer counts."""
        return (
            f"{self.num_retrieval}/{self.num_layers * self.num_kv_heads} retrieval heads "
            f"({self.retrieval_fraction:.1%}), per layer of {self.num_kv_heads}: "
            f"{self.compact_counts()}"
        )


# --------------------------------------------------------------------------------------------
# Bundled patterns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledPattern:
    """A pattern shipped with vllm-duo, described by its ``model.json``.

    ``shape`` holds ``num_layers``, ``num_attention_heads``, ``num_kv_heads`` and ``head_size``
    of the model the pattern was trained for.
    """

    name: str
    path: Path
    model_ids: tuple[str, ...]
    shape: dict[str, int]
    recommended_sparsity: float

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_kv_heads"):
            value = self.shape.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DuoConfigError(
                    f"bundled pattern '{self.name}' {MODEL_FILE}: shape.{key}={value!r} must be "
                    f"a positive integer; fix {self.path / MODEL_FILE}."
                )
        if not self.model_ids or not all(isinstance(m, str) and m for m in self.model_ids):
            raise DuoConfigError(
                f"bundled pattern '{self.name}' {MODEL_FILE}: model_ids={list(self.model_ids)!r} "
                f"must be a non-empty list of model ids; fix {self.path / MODEL_FILE}."
            )
        try:
            _check_fraction("recommended_sparsity", self.recommended_sparsity)
        except DuoConfigError as exc:
            raise DuoConfigError(
                f"bundled pattern '{self.name}' {MODEL_FILE}: {exc} Fix {self.path / MODEL_FILE}."
            ) from None

    @property
    def num_layers(self) -> int:
        """Decoder layers of the pattern's model."""
        return self.shape["num_layers"]

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer of the pattern's model."""
        return self.shape["num_kv_heads"]


def bundled_patterns_dir() -> Path:
    """Directory holding the bundled patterns.

    An installed wheel may ship them as the package ``vllm_duo._patterns``; a source checkout
    keeps them in ``patterns/`` at the repository root.
    """
    try:
        root = importlib.resources.files("vllm_duo._patterns")
    except ModuleNotFoundError:
        root = None
    if root is not None:
        # Path for a plain directory package; other Traversables (zip imports) are not
        # supported because the pattern files are read with ordinary file I/O.
        candidate = root if isinstance(root, Path) else Path(str(root))
        if candidate.is_dir():
            return candidate
    return Path(__file__).resolve().parent.parent / "patterns"


def _read_model_json(directory: Path) -> BundledPattern:
    meta_path = directory / MODEL_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DuoConfigError(
            f"bundled pattern file '{meta_path}' cannot be read as JSON ({exc}); reinstall "
            f"vllm-duo or fix the file."
        ) from None
    if not isinstance(meta, dict):
        raise DuoConfigError(
            f"bundled pattern file '{meta_path}' must hold a JSON object; fix the file."
        )
    model_ids = meta.get("model_ids") or []
    shape = meta.get("shape") or {}
    if not isinstance(model_ids, list) or not isinstance(shape, dict):
        raise DuoConfigError(
            f"bundled pattern file '{meta_path}': model_ids must be a list and shape an object; "
            f"fix the file."
        )
    return BundledPattern(
        name=directory.name,
        path=directory,
        model_ids=tuple(model_ids),
        shape=dict(shape),
        recommended_sparsity=meta.get("recommended_sparsity", 0.5),
    )


def list_bundled() -> list[BundledPattern]:
    """All bundled patterns (directories with a gate table and ``model.json``), sorted by name."""
    root = bundled_patterns_dir()
    if not root.is_dir():
        logger.warning("bundled pattern directory %s does not exist", root)
        return []
    found: list[BundledPattern] = []
    for directory in sorted(root.iterdir(), key=lambda p: p.name):
        if not directory.is_dir():
            continue
        if not (directory / GATES_FILE).is_file() or not (directory / MODEL_FILE).is_file():
            logger.debug("skipping %s: no %s or %s", directory, GATES_FILE, MODEL_FILE)
            continue
        found.append(_read_model_json(directory))
    return found


def _basename(model_id: str) -> str:
    """Last component of a repo id or local path, lower-cased ('/m/Llama/' -> 'llama')."""
    return model_id.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def resolve_pattern(
    spec: str | None,
    model_id: str | None,
    model_shape: tuple[int, int] | None,
) -> tuple[Path, str]:
    """Find the pattern to use; returns ``(path, label)``.

    ``spec`` (usually ``VLLM_DUO_PATTERN``) may be a bundled pattern name (case-insensitive) or
    a path to a pattern directory / TSV file; the returned path is what :func:`load_gates`
    accepts. An explicit spec is not shape-checked here: call :func:`check_shape` after loading.

    Without a spec, ``model_id`` (a Hugging Face repo id or local path) is matched against the
    bundled patterns' ``model_ids``: exactly (case-insensitive) first, else by last path
    component, so ``/models/Llama-3-8B-Instruct-Gradient-1048k`` matches
    ``gradientai/Llama-3-8B-Instruct-Gradient-1048k``. With ``model_shape`` =
    ``(num_layers, num_kv_heads)``, only patterns of that shape match.

    The label is human-readable text for logs: ``bundled:NAME`` or the path.
    """
    bundled = list_bundled()
    names = ", ".join(b.name for b in bundled) or "(none installed)"

    if spec is not None and spec.strip():
        wanted = spec.strip()
        for pattern in bundled:
            if pattern.name.lower() == wanted.lower():
                return pattern.path, f"bundled:{pattern.name}"
        try:
            path = Path(wanted).expanduser()
            is_dir, is_file = path.is_dir(), path.is_file()
            has_gates = is_dir and (path / GATES_FILE).is_file()
        except (OSError, RuntimeError) as exc:
            # expanduser raises RuntimeError for an unknown ~user; stat raises OSError for a
            # name too long or a directory that may not be searched.
            raise DuoConfigError(
                f"{_ENV_PATTERN}={spec!r} is not a bundled pattern name and cannot be used as a "
                f"path ({_os_reason(exc)}): {_PATTERN_HINT}."
            ) from None
        if is_dir:
            if not has_gates:
                raise DuoConfigError(
                    f"{_ENV_PATTERN}={spec!r} is a directory without {GATES_FILE}: {_PATTERN_HINT}."
                )
            return path, str(path)
        if is_file:
            return path, str(path)
        raise DuoConfigError(
            f"{_ENV_PATTERN}={spec!r} is neither a bundled pattern name ({names}) nor an "
            f"existing path: {_PATTERN_HINT}."
        )

    if not model_id:
        raise DuoConfigError(
            f"{_ENV_PATTERN} is unset and no model id was given to find a bundled pattern: "
            f"{_PATTERN_HINT}."
        )
    # Exact ids first so that a basename collision can never beat a full repo-id match.
    exact = [b for b in bundled if any(m.lower() == model_id.lower() for m in b.model_ids)]
    base = _basename(model_id)
    by_name = [
        b
        for b in bundled
        if b.name not in {e.name for e in exact} and any(_basename(m) == base for m in b.model_ids)
    ]
    candidates = exact + by_name
    if model_shape is not None:
        fitting = [b for b in candidates if (b.num_layers, b.num_kv_heads) == tuple(model_shape)]
        if candidates and not fitting:
            first = candidates[0]
            raise DuoConfigError(
                f"bundled pattern '{first.name}' matches model {model_id!r} by name but has shape "
                f"{first.num_layers}x{first.num_kv_heads} (layers x KV heads) while the model has "
                f"{model_shape[0]}x{model_shape[1]}: {_PATTERN_HINT}."
            )
        candidates = fitting
    if not candidates:
        shape_text = "" if model_shape is None else f" (shape {model_shape[0]}x{model_shape[1]})"
        raise DuoConfigError(
            f"no bundled DuoAttention pattern matches model {model_id!r}{shape_text} "
            f"(bundled: {names}) and {_ENV_PATTERN} is unset: {_PATTERN_HINT}."
        )
    chosen = candidates[0]
    if len(candidates) > 1:
        logger.debug(
            "model %r matches bundled patterns %s; using %s",
            model_id,
            [b.name for b in candidates],
            chosen.name,
        )
    return chosen.path, f"bundled:{chosen.name}"


# --------------------------------------------------------------------------------------------
# Picture (optional matplotlib)
# --------------------------------------------------------------------------------------------


def render_png(
    gates: np.ndarray,
    path: str | os.PathLike[str],
    *,
    mask: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Draw the gate matrix as a heat map (layers down, KV heads across) and save it as PNG.

    With ``mask`` (True = retrieval head), retrieval heads get a white dot. Needs matplotlib,
    imported here only, so the rest of the module stays light.
    """
    values = np.clip(np.asarray(gates, dtype=np.float64), 0.0, 1.0)
    if values.ndim != 2 or values.size == 0:
        raise DuoConfigError(
            f"gate matrix has shape {values.shape}: expected a non-empty 2-D array "
            f"(layers x KV heads)."
        )
    if mask is not None and np.shape(mask) != values.shape:
        raise DuoConfigError(
            f"retrieval mask has shape {np.shape(mask)} but the gates have shape {values.shape}: "
            f"pass the mask computed from these gates."
        )
    try:
        # Figure + Agg canvas instead of pyplot: no global backend state, safe in servers.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DuoConfigError(
            "drawing a pattern PNG needs matplotlib, which is not installed: "
            "pip install matplotlib, or omit --png."
        ) from None

    layers, heads = values.shape
    figure = Figure(figsize=(min(2.0 + 0.25 * heads, 14.0), min(1.5 + 0.2 * layers, 14.0)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    if mask is not None:
        from matplotlib.patches import Rectangle

        rows, cols = np.nonzero(np.asarray(mask, dtype=bool))
        # Outlined cells stay visible on every colour of the map, bright or dark.
        for row, col in zip(rows, cols):
            axes.add_patch(
                Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2)
            )
        axes.legend(
            handles=[Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", label="retrieval head")],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.08 - 0.5 / max(layers, 1)),
            fontsize="small",
            frameon=False,
        )
    axes.set_xlabel("KV head")
    axes.set_ylabel("layer")
    if title:
        axes.set_title(title)
    figure.colorbar(image, ax=axes, label="gate")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, format="png", dpi=100)
    return out
