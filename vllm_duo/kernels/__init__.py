"""Attention kernels for streaming heads. Pure: nothing here imports vLLM."""
