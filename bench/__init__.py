"""Microbenchmarks against eager PyTorch and the frozen linear layer."""
