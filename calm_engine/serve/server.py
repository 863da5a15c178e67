"""Run the server: load and warm up the model, bind, serve until SIGTERM/SIGINT, shut down gracefully (exit 0).

On the signal the server stops accepting (new connections are refused, requests on open ones get 503), lets running
requests finish for up to `shutdown_timeout` seconds, then aborts what is left (streams end with finish_reason
"abort"), stops the engine loop and returns. A second SIGINT quits at once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading

import torch
import uvicorn

from calm_engine.engine.llm_engine import LLM
from calm_engine.sampling_params import SamplingParams
from calm_engine.serve.app import create_app
from calm_engine.serve.config import ServeConfig
from calm_engine.serve.engine_loop import EngineLoop
from calm_engine.serve.metrics import ServerMetrics

logger = logging.getLogger("calm_engine.serve")

DEFAULT_MODEL_ID = "calm-default"
GRACE_MARGIN_S = 5.0  # after the abort, time for streams to send their last chunk before uvicorn cancels them
# The engine thread needs the GIL for a moment after every step, while the event loop may hold it for milliseconds
# turning the previous step into events; a waiting thread forces a switch only after this long (CPython's default:
# 5 ms). 0.1 ms: 64 streams on 2 cores went from 0.68 to 0.76 of offline throughput (benchmarks/RESULTS.md).
GIL_SWITCH_INTERVAL_S = 1e-4


def warm_up(llm: LLM) -> None:
    """One prefill and a few decode steps on each sampling path, so that the first client does not pay for them."""
    prompt = [1, 2, 3, 4, 5]
    llm.generate([prompt, prompt], [SamplingParams(max_tokens=8, seed=0), SamplingParams(max_tokens=8, seed=1)])
    llm.generate([prompt], SamplingParams(temperature=0.5, num_samples=8, max_tokens=8, seed=0))


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown signal arrives, and exiting 0 after a graceful stop (uvicorn
    re-raises the signal once it is done, which would end the process with the signal's status)."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def serve(llm: LLM, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until a shutdown signal; returns 0 after a graceful stop. Prints `listening on URL` once ready."""
    if llm.model.tokenizer is None:
        raise ValueError("calm serve needs a model with a tokenizer (pass --tokenizer DIR for one that has none)")
    _configure_logging(log_level)
    metrics = ServerMetrics()
    loop = EngineLoop(llm.engine, config.max_waiting, metrics)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound_port = sock.getsockname()[1]
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"

    def ready():
        logger.info("serving %s (%d KV slots) on %s", config.model_id, loop.slots, url)
        print(f"calm serve: listening on {url}", flush=True)

    def begin_shutdown():
        logger.info("shutting down: refusing new requests, %.0f s for running ones to finish", config.shutdown_timeout)
        loop.stop_accepting()
        timer = threading.Timer(config.shutdown_timeout, loop.abort_all)
        timer.daemon = True
        timer.start()

    app = create_app(loop, llm.model.tokenizer, config, metrics, on_ready=ready)
    uvicorn_config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,  # the completions route logs one line per request itself
        timeout_graceful_shutdown=config.shutdown_timeout + GRACE_MARGIN_S,
        lifespan="on",
    )
    server = _Server(uvicorn_config, begin_shutdown)
    # The model, torch and the tokenizer leave ~330,000 objects that every full collection would walk while holding
    # the GIL (145 ms each under a 64-stream load, the engine stalled meanwhile): they live as long as the server,
    # so collections skip them from now on.
    gc.collect()
    gc.freeze()
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        with sock:
            server.run(sockets=[sock])
    finally:
        sys.setswitchinterval(switch_interval)
    loop.stop()
    return 0 if server.started else 1


def config_from_args(args, environ=os.environ) -> ServeConfig:
    """The ServeConfig of a `calm serve` command line; --api-key wins over CALM_API_KEY."""
    api_key = args.api_key if args.api_key is not None else environ.get("CALM_API_KEY") or None
    return ServeConfig(
        model_id=args.served_model_name or (args.model if args.model is not None else DEFAULT_MODEL_ID),
        api_key=api_key,
        max_waiting=args.max_waiting,
        max_body_bytes=args.max_body_size,
        max_num_samples=args.max_num_samples,
        shutdown_timeout=args.shutdown_timeout,
        stream_interval=args.stream_interval,
    )


def main(args) -> int:
    """`calm serve` with the parsed command line (cli.py)."""
    config = config_from_args(args)
    if args.threads is not None:  # torch's default otherwise; benchmarks/RESULTS.md compares 1 and 2 on 2 cores
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    warm_up(llm)
    return serve(llm, config, host=args.host, port=args.port, log_level=args.log_level)


def _configure_logging(level: str) -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s calm serve: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
