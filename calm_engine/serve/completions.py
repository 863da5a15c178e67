"""POST /v1/completions: a validated request becomes engine requests, one per prompt and choice; the answer is one JSON
body or a stream of server-sent events ending with `data: [DONE]`.

Seeds: choice i (OpenAI's `index`, i = prompt_index * n + j) is sampled with seed (seed + i) mod 2**63, so a seeded
request reproduces whether streamed or not and whatever else runs, and choice i equals
`LLM.generate(prompt, SamplingParams(seed=seed + i, ...))`. Without a seed the engine draws a fresh one per choice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse

from calm_engine.sampling_params import SamplingParams
from calm_engine.serve import protocol
from calm_engine.serve.config import ServeConfig
from calm_engine.serve.engine_loop import EngineFailed, EngineLoop, NotAccepting, QueueFull, RequestHandle
from calm_engine.serve.errors import APIError
from calm_engine.serve.event_stream import EventStream
from calm_engine.serve.metrics import ServerMetrics
from calm_engine.serve.text_stream import ChoiceText

logger = logging.getLogger("calm_engine.serve")

OPENAI_DEFAULT_MAX_TOKENS = 16
SEED_MODULUS = 2**63  # SamplingParams takes seeds in [0, 2**63)
# Parameters an engine or SamplingParams message may start with, so a 400 can name the one at fault.
KNOWN_PARAMS = ("temperature", "max_tokens", "num_samples", "seed", "sampler", "stop", "prompt")
DONE = "data: [DONE]\n\n"
# Completion ids: 128 random bits, as uuid4 has, from a generator seeded once from os.urandom (uuid4 reads
# os.urandom for every request: a system call, ~17 us on this machine's VM).
_ids = random.Random()


def completion_room(prompt_tokens: int, chunk_size: int, capacity: int) -> int:
    """Tokens the engine can generate after a prompt: its padded chunks take cache positions, and the engine ends a
    request once no position is left for the chunk just produced, so that last chunk needs none: capacity - prompt
    chunks + 1 chunks of K tokens (tests/serve checks this against the engine)."""
    return (capacity - math.ceil(prompt_tokens / chunk_size) + 1) * chunk_size


@dataclass
class Choice:
    index: int
    request_id: str
    text: ChoiceText
    prompt_ids: list[int]
    prompt_text: str | None = None  # echoed before the completion when `echo`
    tokens: int = 0
    finish_reason: str | None = None
    held: str = ""  # text not streamed yet (stream_interval)
    held_steps: int = 0  # steps whose text is in `held`
    streamed_text: bool = False  # some text was streamed already


@dataclass
class Job:
    """One HTTP request in flight: what its log line and usage report."""

    completion_id: str
    created: int
    arrived: float
    prompt_tokens: int
    choices: list[Choice]
    by_request_id: dict[str, Choice] = field(default_factory=dict)
    first_output: float | None = None
    closed: bool = False
    running: int = 0  # choices without a finish reason (checked after every step: a count, not a scan)

    def __post_init__(self):
        self.by_request_id = {c.request_id: c for c in self.choices}
        self.running = len(self.choices)

    @property
    def unfinished(self) -> list[str]:
        return [c.request_id for c in self.choices if c.finish_reason is None]

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, sum(c.tokens for c in self.choices))


class CompletionService:
    def __init__(self, loop: EngineLoop, tokenizer, config: ServeConfig, metrics: ServerMetrics):
        self.loop = loop
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        engine = loop.engine
        self.chunk_size = engine.chunk_size
        self.capacity = engine.cache.capacity
        self.eos_ids = frozenset(engine.config.eos_token_ids)
        # Streams decode through the tokenizer's byte table where it has one that covers the model's ids.
        table = tokenizer.token_bytes() if hasattr(tokenizer, "token_bytes") else None
        self.token_bytes = table if table is not None and len(table) >= engine.config.vocab_size else None

    @property
    def max_model_len(self) -> int:
        return self.capacity * self.chunk_size

    async def create(self, body: protocol.CompletionRequest, http: Request):
        arrived = time.perf_counter()
        protocol.unsupported_fields(body)
        if body.model != self.config.model_id:
            message = f"the model {body.model!r} does not exist: this server serves {self.config.model_id!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        prompts = [self._prompt_ids(p, i, len(body.prompt)) for i, p in enumerate(body.prompt)]
        params = self._sampling_params(body, prompts)
        job = self._job(body, prompts, arrived)
        try:
            fed = [c.prompt_ids for c in job.choices]
            handle = self.loop.submit([c.request_id for c in job.choices], fed, params)
        except QueueFull as full:
            retry = str(self.config.retry_after_s)
            message = f"the server is at capacity ({full}): retry after {retry} s"
            raise APIError(503, message, code="queue_full", headers={"Retry-After": retry}) from None
        except NotAccepting as why:
            raise APIError(503, f"not accepting requests: {why}", code="unavailable") from None
        await self._accepted(handle, job, len(prompts), body.n, body.echo)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(self._stream(handle, job, body.echo, include_usage), lambda: self._finish(handle, job))
        return await self._collect(handle, job, http)

    # ---- request -> engine requests ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | list[int], index: int, count: int) -> list[int]:
        where = f"prompt {index}" if count > 1 else "the prompt"
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise APIError(400, f"{where} is empty: give at least one token", param="prompt")
        if math.ceil(len(ids) / self.chunk_size) > self.capacity:
            raise APIError(
                400,
                f"{where} has {len(ids)} tokens, more than this model's context of {self.max_model_len} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        return ids

    def _sampling_params(self, body: protocol.CompletionRequest, prompts: list[list[int]]) -> list[SamplingParams]:
        choices = len(prompts) * body.n
        if choices > self.loop.capacity:
            raise APIError(
                400,
                f"{len(prompts)} prompts x n={body.n} = {choices} completions, more than the server holds at once "
                f"({self.loop.capacity}: --max-batch-size + --max-waiting)",
                param="n",
            )
        if body.num_samples is not None and body.num_samples > self.config.max_num_samples:
            raise APIError(
                400,
                f"num_samples={body.num_samples} is over this server's bound of {self.config.max_num_samples} head "
                "samples per step (--max-num-samples)",
                param="num_samples",
            )
        if body.seed is not None and not 0 <= body.seed < SEED_MODULUS:
            raise APIError(400, f"seed must be in [0, 2**63), got {body.seed}", param="seed")
        extra = {k: getattr(body, k) for k in ("num_samples", "sampler") if getattr(body, k) is not None}
        params = []
        for p, ids in enumerate(prompts):
            room = completion_room(len(ids), self.chunk_size, self.capacity)
            if body.max_tokens is not None and body.max_tokens > room:
                raise APIError(
                    400,
                    f"max_tokens={body.max_tokens} is more than the context leaves: {self.max_model_len} tokens "
                    f"({self.capacity} chunks of K={self.chunk_size}), the prompt{f' {p}' if len(prompts) > 1 else ''}"
                    f" takes {len(ids)} tokens, which leaves room for {room} generated tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = body.max_tokens or min(OPENAI_DEFAULT_MAX_TOKENS, room)
            for j in range(body.n):
                seed = None if body.seed is None else (body.seed + p * body.n + j) % SEED_MODULUS
                try:
                    params.append(
                        SamplingParams(
                            temperature=1.0 if body.temperature is None else body.temperature,
                            max_tokens=max_tokens,
                            seed=seed,
                            stop=tuple(body.stop),
                            ignore_eos=body.ignore_eos,
                            **extra,
                        )
                    )
                except (ValueError, TypeError) as error:
                    raise APIError(400, str(error), param=_param_named_in(str(error))) from None
        return params

    def _job(self, body: protocol.CompletionRequest, prompts: list[list[int]], arrived: float) -> Job:
        completion_id = f"cmpl-{_ids.getrandbits(128):032x}"
        choices = []
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                text = ChoiceText(self.tokenizer, body.stop, self.eos_ids, self.token_bytes)
                choices.append(Choice(index, f"{completion_id}-{index}", text, ids))
        return Job(completion_id, int(time.time()), arrived, sum(len(ids) for ids in prompts), choices)

    async def _accepted(self, handle: RequestHandle, job: Job, prompt_count: int, n: int, echo: bool) -> None:
        try:
            await handle.accepted
        except (ValueError, TypeError) as error:
            message = str(error)
            if prompt_count > 1 and handle.failed_at is not None:
                message = f"prompt {handle.failed_at // n}: {message}"
            raise APIError(400, message, param=_param_named_in(message)) from None
        except EngineFailed as error:
            raise APIError(503, str(error), code="engine_failed") from None
        except asyncio.CancelledError:
            self.loop.abort(handle.request_ids)
            raise
        if echo:  # the prompt as text, decoded from its ids (now known to be in the vocabulary)
            for choice in job.choices:
                choice.prompt_text = self.tokenizer.decode(choice.prompt_ids)

    # ---- engine outputs -> answers ----------------------------------------------------------------------------

    async def _next(self, handle: RequestHandle, job: Job, steps: int = 1) -> list[Choice]:
        """Wait for outputs of `steps` steps (or for one that finishes a choice) and apply all that are queued: each
        choice's new text is added to its `held` text, and its finish reason set when it ends. Returns the choices
        that advanced."""
        items = await handle.outputs.take_all(steps)
        if job.first_output is None:
            job.first_output = time.perf_counter()
            self.metrics.first_chunk.observe(job.first_output - job.arrived)
        advanced: dict[int, Choice] = {}
        for item in items:
            if isinstance(item, BaseException):
                raise item
            for output in item:
                choice = job.by_request_id[output.request_id]
                advanced[choice.index] = choice
                choice.held_steps += 1
                if output.finish_reason != "abort":  # an abort carries no ids: the choice keeps what it had
                    choice.tokens = len(output.token_ids)
                if not output.finished:
                    choice.held += choice.text.add(output.new_token_ids)
                else:  # the final text, cut before a stop string that this step's ids may have completed
                    choice.held += choice.text.finish(None if output.finish_reason == "abort" else output.text)
                    if choice.finish_reason is None:
                        job.running -= 1
                    choice.finish_reason = output.finish_reason
        return list(advanced.values())

    async def _collect(self, handle: RequestHandle, job: Job, http: Request) -> JSONResponse:
        disconnected = asyncio.ensure_future(_wait_for_disconnect(http))
        try:
            while job.running:
                waiter = asyncio.ensure_future(self._next(handle, job))
                await asyncio.wait({waiter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    return JSONResponse({})  # nobody reads it; `finally` aborts the choices
                self._raise_failure(waiter)
        finally:
            disconnected.cancel()
            self._finish(handle, job)
        choices = [
            protocol.completion_choice(c.index, (c.prompt_text or "") + c.text.text, c.finish_reason)
            for c in job.choices
        ]
        body = protocol.completion(job.completion_id, job.created, self.config.model_id, choices, job.usage())
        return JSONResponse(body)

    async def _stream(self, handle: RequestHandle, job: Job, echo: bool, include_usage: bool):
        """Yields (events, last) for EventStream: one event per choice and step, or per `stream_interval` steps (the
        first text and the end at once); the last text, the usage and [DONE] go together, in one write."""
        encoder = protocol.ChunkEncoder(job.completion_id, job.created, self.config.model_id, include_usage)
        interval = self.config.stream_interval
        try:
            if echo:
                yield "".join(encoder.choice(c.index, c.prompt_text, None) for c in job.choices).encode(), False
            while job.running:
                # Wake when some choice's text is due: the first text at once, then every `interval` steps.
                due = 1
                if interval > 1:
                    due = min(
                        interval - c.held_steps if c.streamed_text else 1 for c in job.choices if not c.finish_reason
                    )
                try:
                    advanced = await self._next(handle, job, due)
                except EngineFailed as error:
                    failure = {"error": {"message": str(error), "type": "server_error"}}
                    yield f"data: {protocol.to_json(failure)}\n\n".encode(), True
                    return
                events = []
                for choice in advanced:
                    if choice.finish_reason is not None or (
                        choice.held and (choice.held_steps >= interval or not choice.streamed_text)
                    ):
                        events.append(encoder.choice(choice.index, choice.held, choice.finish_reason))
                        choice.streamed_text = choice.streamed_text or bool(choice.held)
                        choice.held, choice.held_steps = "", 0
                if not job.running:
                    if include_usage:
                        events.append(encoder.usage(job.usage()))
                    events.append(DONE)
                    yield "".join(events).encode(), True
                elif events:
                    yield "".join(events).encode(), False
        finally:
            self._finish(handle, job)

    @staticmethod
    def _raise_failure(waiter: asyncio.Future) -> None:
        error = waiter.exception()
        if isinstance(error, EngineFailed):
            raise APIError(503, str(error), code="engine_failed")
        if error is not None:
            raise error

    def _finish(self, handle: RequestHandle, job: Job) -> None:
        """Abort what is left (the client went away) and log the request's line; once per request."""
        if job.closed:
            return
        job.closed = True
        unfinished = job.unfinished
        if unfinished:
            self.loop.abort(unfinished)
        now = time.perf_counter()
        first = "-" if job.first_output is None else f"{(job.first_output - job.arrived) * 1e3:.1f}ms"
        reasons = ",".join(c.finish_reason or "disconnected" for c in job.choices)
        logger.info(
            "%s prompt_tokens=%d output_tokens=%d first_chunk=%s total=%.1fms finish=%s",
            job.completion_id,
            job.prompt_tokens,
            sum(c.tokens for c in job.choices),
            first,
            (now - job.arrived) * 1e3,
            reasons,
        )


async def _wait_for_disconnect(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _param_named_in(message: str) -> str | None:
    match = re.search(r"\b(" + "|".join(KNOWN_PARAMS) + r")\b", message)
    return match.group(1) if match else None
