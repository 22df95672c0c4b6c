"""Test helpers for vllm_duo: tiny offline models and deterministic prompts."""
