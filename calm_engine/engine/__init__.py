"""The engine: requests, scheduling, the KV cache, the model runner, likelihood-free sampling and CUDA graphs."""
