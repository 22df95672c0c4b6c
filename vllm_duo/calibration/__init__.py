"""DuoAttention pattern calibration (``vllm-duo calibrate``).

- :mod:`~vllm_duo.calibration.data`: synthetic multi-passkey prompts, built offline.
- :mod:`~vllm_duo.calibration.gated_attention`: the gated full/streaming attention hook.
- :mod:`~vllm_duo.calibration.train`: :class:`CalibrationConfig` and :func:`calibrate`.

Never imports vLLM. Importing this package is cheap: torch and transformers load only when
:func:`calibrate` runs.
"""

from __future__ import annotations

from vllm_duo.calibration.train import CalibrationConfig, calibrate

__all__ = ["CalibrationConfig", "calibrate"]
