"""ServeConfig: the server's limits and identity (the engine's own options go to LLM), validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """model_id: the name clients pass as `model`. api_key: None serves without authentication.
    max_waiting: engine requests (one per prompt and choice) that may wait for a KV slot; beyond it a request gets
        503 with Retry-After. max_body_bytes: larger request bodies get 413. max_num_samples: the largest
        `num_samples` (head samples per step below T = 1) a request may ask for; each costs memory and time in the
        step every running request shares. shutdown_timeout: seconds running requests get to finish after
        SIGTERM/SIGINT before they are aborted. stream_interval: a stream sends its text every this many engine steps
        (its first text and its end at once); above 1 fewer, larger events, for throughput with many streams.
    """

    model_id: str
    api_key: str | None = None
    max_waiting: int = 256
    max_body_bytes: int = 1 << 20
    max_num_samples: int = 4096
    shutdown_timeout: float = 30.0
    stream_interval: int = 1
    retry_after_s: int = 1

    def __post_init__(self):
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string (or None to serve without one)")
        minimums = {"max_waiting": 0, "max_body_bytes": 1, "max_num_samples": 1, "stream_interval": 1}
        for name, minimum in {**minimums, "retry_after_s": 1}.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        t = self.shutdown_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"shutdown_timeout must be a finite number of seconds >= 0, got {t!r}")
