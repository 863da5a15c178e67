"""More than one process: the process group (group.py), data parallelism (a shard of the work per rank, sums across
ranks) and tensor parallelism of the PyTorch step (tensor_parallel.py, workers.py)."""
