"""Session fixtures for the vllm layer."""
