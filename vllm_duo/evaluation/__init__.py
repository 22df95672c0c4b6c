"""Accuracy evaluation helpers (pure: no vLLM import)."""
