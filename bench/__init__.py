"""Benchmarks of llava_jax against transformers' PyTorch LLaVA on the same weights (see bench/README.md)."""
