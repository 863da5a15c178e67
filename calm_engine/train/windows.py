"""Token streams and the random windows every trainer draws its batches from."""

from __future__ import annotations

import torch


def token_stream(documents: list[list[int]], eos_token_id: int) -> torch.Tensor:
    """Documents' ids concatenated into one int64 stream, each document followed by eos (the boundary the model
    learns to predict)."""
    ids = [token for document in documents for token in (*document, eos_token_id)]
    if not ids:
        raise ValueError("no documents to build a token stream from")
    return torch.tensor(ids, dtype=torch.int64)


def random_windows(stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch_size, length] windows starting at uniformly random offsets of a 1-D stream."""
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {list(stream.shape)}")
    if not 0 < length <= stream.numel():
        raise ValueError(f"window length {length} must be in [1, {stream.numel()}] (the stream's length)")
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=generator)
    return stream[starts[:, None] + torch.arange(length)]
