"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process, as in tests).

Gauges are read from the engine loop when scraped; counters and histograms are updated as things happen, from the
engine thread (steps, finished requests) and the event loop (accepted and rejected requests, first chunks).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from calm_engine.serve.engine_loop import LoopStats

# Seconds. A CPU step of the default model takes 0.3-8 ms; a GPU step of CALM-M or a step with a large sample pool
# takes tens of ms; a first chunk waits for a prefill and, under load, for a free slot.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
FIRST_CHUNK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _LoopGauges:
    """Requests running and waiting and KV slots in use, read from the engine loop at scrape time."""

    def __init__(self, stats: Callable[[], LoopStats]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        for name, help_text, value in (
            ("calm_requests_running", "engine requests (one per prompt and choice) holding a KV slot", stats.running),
            ("calm_requests_waiting", "engine requests accepted and waiting for a KV slot", stats.waiting),
            ("calm_kv_slots_used", "KV-cache slots in use", stats.slots_used),
            ("calm_kv_slots_total", "KV-cache slots (--max-batch-size)", stats.slots_total),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.finished = Counter("calm_requests_finished", "engine requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("calm_requests_rejected", "HTTP requests refused, by status", ["status"], registry=r)
        self.prompt_tokens = Counter("calm_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("calm_generation_tokens", "tokens generated", registry=r)
        self.first_chunk = Histogram(
            "calm_time_to_first_chunk_seconds",
            "from a request's arrival to its first generated chunk",
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.step_time = Histogram("calm_step_seconds", "engine step() time", buckets=STEP_BUCKETS, registry=r)

    def watch(self, stats: Callable[[], LoopStats]) -> None:
        self.registry.register(_LoopGauges(stats))

    # called by the engine thread
    def observe_step(self, seconds: float, tokens: int) -> None:
        self.step_time.observe(seconds)
        self.generation_tokens.inc(tokens)

    def count_finished(self, reason: str) -> None:
        self.finished.labels(reason=reason).inc()

    def count_rejected(self, status: int) -> None:
        self.rejected.labels(status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
