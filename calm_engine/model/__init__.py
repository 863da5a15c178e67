"""The CALM model in plain PyTorch (the reference for every fast path) and its checkpoint I/O."""
