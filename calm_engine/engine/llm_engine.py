"""LLMEngine, the step-level API for embedding the engine, and LLM, the offline batch API built on it.

    engine = LLMEngine(model)                    # or LLM(...).engine; keywords: EngineConfig's fields
    engine.add_request("a", "Once upon", SamplingParams(temperature=0.5, seed=1))
    while engine.has_unfinished_requests():
        for out in engine.step():                # new ids of every running request (streaming)
            ...
    engine.abort("a")

One step: the scheduler admits waiting requests into free cache slots; the policy (step/policy.py) picks a backend
for the admitted rows' prefill and one for the running rows' decode; each returns a StepResult (the next chunk of
every row and the exact sampler's fallback flags); the engine copies them to the host once and applies each chunk
(stop rules, pad stripping, slot release). The engine holds no backend-specific code (ARCHITECTURE.md).

Prompts of any length: the model reads whole K-token chunks. The official rule ("right", default) pads the last
partial chunk of the prompt with the pad id on the right, feeds the pads like tokens, and drops pad ids from the
output. "left" pads the first chunk on the left instead, so the prompt's last real token is the last thing the model
reads before generating (the pads then sit where a document boundary would). Generated pad ids are fed back but not
reported, as the official generate does.

A token-level Llama (model/token_llama.py, the K = 1 baseline) runs through the same engine (step/token_step.py):
chunks are single tokens, and every step samples one token per request at its temperature (Gumbel-max over the
logits); SamplingParams' num_samples, sampler and exact_max_pools do not apply to it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from calm_engine.engine.config import EngineConfig
from calm_engine.engine.kv_cache import SlotKVCache, capacity_for
from calm_engine.engine.prompts import pad_prompt, prompt_ids, prompt_list
from calm_engine.engine.request import Request, RequestOutput
from calm_engine.engine.scheduler import Scheduler
from calm_engine.engine.step.interface import Phase, StepBackend, StepRow
from calm_engine.engine.step.policy import build_backends, choose_backend, device_summary
from calm_engine.engine.weights import ModelWeights
from calm_engine.kernels import ae_decode
from calm_engine.model.calm import CalmModel
from calm_engine.model.checkpoint import load
from calm_engine.model.token_llama import TokenLlama
from calm_engine.sampling_params import SamplingParams

logger = logging.getLogger("calm_engine")


class LLMEngine:
    """Continuous batching over up to `max_batch_size` concurrent requests, each in its own KV-cache slot.

    model: a loaded CalmModel or TokenLlama. config: an EngineConfig, or its fields as keywords.
    """

    def __init__(self, model: CalmModel | TokenLlama, config: EngineConfig | None = None, **options):
        if config is None:
            config = EngineConfig(**options)
        elif options:
            raise TypeError(f"give an EngineConfig or its fields as keywords, not both (got {sorted(options)})")
        self.model = model
        self.config = model.config  # the model's config (what calm_engine.serve reads); the engine's is engine_config
        self.engine_config = config
        self.chunk_size = model.config.chunk_size
        capacity = capacity_for(model.config, config.max_model_len)
        # Under tensor parallelism each rank's cache holds its kv_heads / N heads.
        self.cache = SlotKVCache(
            model.config, config.max_batch_size, capacity, model.device, model.dtype, config.kv_cache_memory,
            shards=config.tensor_parallel_size,
        )  # fmt: skip
        self.weights = ModelWeights.of(model)
        self.backends = build_backends(self.weights, self.cache, config)
        self.scheduler = Scheduler(config.max_batch_size)
        # A token-level model draws one token per row whatever num_samples says: no pool.
        self.sample_row_bytes = sample_row_bytes(model) if self.weights.is_calm else 0
        self.decode_block_bytes = decode_block_bytes(model) if self.weights.is_calm else 0
        self.requests: dict[str, Request] = {}
        self._seed_source = random.Random(config.seed)
        self._eos_ids = set(model.config.eos_token_ids)
        self.stats = {"steps": 0, "prefill_rows": 0, "decode_rows": 0, "exact_fallbacks": 0}
        logger.info("%s", self.describe())

    def describe(self) -> str:
        """What this engine resolved: model, device, dtype, threads, its backends and their options, the config."""
        return (
            f"calm-engine: {device_summary(self.weights)}; {self.backends.describe()}; {self.engine_config.describe()}"
        )

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (also at exit); a no-op for one process."""
        self.backends.close()

    def backend_for(self, phase: Phase, rows: Sequence[StepRow]) -> StepBackend:
        """The backend the policy picks for this step (step/policy.py): what step() runs, and what benchmarks report."""
        return choose_backend(phase, rows, self.backends, self.engine_config)

    # ---- the step-level API -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None) -> None:
        """Queue a request; everything is validated here, before any shared state changes."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop and self.model.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        self._check_sample_pool(params)
        ids = prompt_ids(prompt, self.model.tokenizer, self.config.vocab_size)
        fed = pad_prompt(ids, self.chunk_size, self.config.pad_token_id, self.engine_config.prompt_padding)
        chunks = len(fed) // self.chunk_size
        if chunks > self.cache.capacity:
            raise ValueError(
                f"prompt of {len(ids)} tokens ({chunks} chunks of K={self.chunk_size}) is longer than "
                f"max_model_len ({self.cache.capacity * self.chunk_size} tokens)"
            )
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        stop_ids = set(params.stop_token_ids) if params.ignore_eos else self._eos_ids | set(params.stop_token_ids)
        request = Request(request_id, ids, fed, params, seed, self.chunk_size, frozenset(stop_ids))
        self.requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Stop a waiting or running request and free its slot; False if it is unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None or request.finished:
            return False
        self.scheduler.finish(request, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Generate one chunk for every running request; returns an output for each request that advanced."""
        running = sorted(self.scheduler.running.values(), key=lambda r: r.slot)  # slot order: see TorchStep.decode
        admitted = self.scheduler.admit()
        if not running and not admitted:
            return []
        results = []
        if admitted:
            self.stats["prefill_rows"] += len(admitted)
            results.append(self.backend_for(Phase.PREFILL, admitted).prefill(admitted))
        if running:
            self.stats["decode_rows"] += len(running)
            results.append(self.backend_for(Phase.DECODE, running).decode(running))
        rows = admitted + running
        chunks = torch.cat([r.chunks for r in results]) if len(results) > 1 else results[0].chunks
        self.stats["steps"] += 1
        if all(r.fell_back is None for r in results):
            host = chunks.tolist()
        else:
            flags = [
                torch.zeros(len(r.chunks), dtype=torch.bool, device=r.chunks.device) if r.fell_back is None
                else r.fell_back
                for r in results
            ]  # fmt: skip
            fell_back = torch.cat(flags)
            host = torch.cat([chunks, fell_back[:, None].to(chunks.dtype)], dim=1).tolist()  # the step's one copy
            self.stats["exact_fallbacks"] += sum(row.pop() for row in host)
        return [self._advance(request, row) for request, row in zip(rows, host, strict=True)]

    # ---- internals --------------------------------------------------------------------------------------------

    def _check_sample_pool(self, params: SamplingParams) -> None:
        """Refuse a request with which some step could draw more head samples than sample_pool_memory allows.

        A step samples a pool [rows, S], S the largest num_samples among its rows, and its rows are at most the
        unfinished requests (or the slots); checking every request as it comes bounds every later step."""
        if not self.sample_row_bytes or params.samples_per_step == 1:
            return
        samples = max([params.samples_per_step, *(r.params.samples_per_step for r in self.requests.values())])
        rows = min(self.engine_config.max_batch_size, len(self.requests) + 1)
        needed = rows * samples * self.sample_row_bytes + self.decode_block_bytes
        if needed <= self.engine_config.sample_pool_memory:
            return
        if rows == 1:
            what = f"num_samples={samples} draws {samples:,} head samples per step"
            fix = "lower num_samples or raise sample_pool_memory"
        else:
            what = (
                f"num_samples={params.num_samples}: a step of the {rows} requests that would run together draws "
                f"{rows} x {samples:,} head samples (the largest num_samples among them)"
            )
            fix = "lower num_samples, run fewer requests at once (max_batch_size), or raise sample_pool_memory"
        raise ValueError(
            f"{what}, about {needed / 2**30:.1f} GiB ({self.sample_row_bytes / 1024:.0f} KiB each), over the "
            f"sample pool budget sample_pool_memory={self.engine_config.sample_pool_memory / 2**30:.1f} GiB: {fix}"
        )

    def _advance(self, request: Request, chunk: list[int]) -> RequestOutput:
        """Apply one sampled chunk on the host: stopping rules, pad stripping, slot release."""
        params = request.params
        request.chunks_done += 1
        request.last_chunk = chunk
        kept, reason = chunk, None
        if request.stop_ids:
            hits = [i for i, token in enumerate(chunk) if token in request.stop_ids]
            if hits:
                kept, reason = (chunk if params.keep_eos_chunk else chunk[: hits[0] + 1]), "stop"
        room = params.max_tokens - request.tokens_generated
        if len(kept) >= room:
            kept, reason = kept[:room], reason or "length"
        request.tokens_generated += len(kept)
        pad = self.config.pad_token_id
        new_ids = [t for t in kept if t != pad]
        request.output_ids.extend(new_ids)
        if reason is None and params.stop:
            reason = self._apply_stop_strings(request)
        if reason is None and request.next_position >= self.cache.capacity:
            reason = "length"  # no room in the cache for the chunk just produced
        if reason is not None:
            self.scheduler.finish(request, reason)
            self.requests.pop(request.request_id, None)
            if self.model.tokenizer is not None and request.text is None:
                request.text = self.model.tokenizer.decode([t for t in request.output_ids if t not in self._eos_ids])
        return RequestOutput(
            request.request_id,
            request.prompt_ids,
            new_ids,
            list(request.output_ids),
            request.finished,
            request.finish_reason,
            request.text,
        )

    def _apply_stop_strings(self, request: Request) -> str | None:
        """Cut the output before the first stop string; ids are cut to the shortest prefix whose text holds it."""
        tokenizer = self.model.tokenizer
        text = tokenizer.decode(request.output_ids)
        cuts = [text.find(s) for s in request.params.stop if s in text]
        if not cuts:
            return None
        request.text = text[: min(cuts)]
        for end in range(1, len(request.output_ids) + 1):
            if any(s in tokenizer.decode(request.output_ids[:end]) for s in request.params.stop):
                del request.output_ids[end:]
                break
        return "stop"


class LLM:
    """Offline batched generation: `LLM(path).generate(prompts, SamplingParams(...))`.

    model: a checkpoint directory (CALM or token-level Llama), a loaded CalmModel / TokenLlama, or None for the shipped
    default model. The remaining keywords are EngineConfig's fields (engine/config.py: max_batch_size, max_model_len,
    kv_cache_memory, sample_pool_memory, prompt_padding, seed, noise, use_kernels, use_cuda_graph, cuda_graph_buckets,
    use_cpu_step, cpu_isa, screen_vocab, step_backend, ...); an unknown one is a TypeError.
    """

    def __init__(
        self,
        model: str | CalmModel | TokenLlama | None = None,
        *,
        device="cpu",
        dtype=torch.float32,
        tokenizer=None,
        **engine_options,
    ):
        if not isinstance(model, (CalmModel, TokenLlama)):
            model = load(model, device=device, dtype=dtype, tokenizer=tokenizer)
        self.model = model
        self.engine = LLMEngine(model, **engine_options)

    def close(self) -> None:
        """Stop the engine's worker processes (tensor_parallel_size > 1); they also stop when this process exits."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: str | Sequence[int] | Iterable[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        prompts: a str or a list of ids (one prompt), a 1-D tensor or array of ids (one prompt), a 2-D one (a prompt
        per row), or a list of any of these. use_tqdm: a progress bar on stderr when it is a terminal.
        If anything interrupts the call (an error, Ctrl-C), its requests are aborted, so the engine stays usable.
        """
        prompts = prompt_list(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the engine has unfinished requests from the step API; finish or abort them first")
        ids = [f"generate-{i}" for i in range(len(prompts))]
        results: dict[str, RequestOutput] = {}
        # disable=None: tqdm shows the bar only when stderr is a terminal.
        bar = tqdm(total=len(ids), desc="generate", unit="prompt", disable=None if use_tqdm else True)
        try:
            for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
                self.engine.add_request(request_id, prompt, p)
            tokens = 0
            while self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                tokens += sum(len(output.new_token_ids) for output in outputs)
                finished = [output for output in outputs if output.finished]
                results.update((output.request_id, output) for output in finished)
                if not bar.disable:
                    bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]


def sample_row_bytes(model: CalmModel) -> int:
    """Bytes one head sample holds at the peak of a sampling step, from the shapes: its noise (float32), the head's
    live activations (about 8 of width hidden_size, and its latent) and the sampler's int64 copies of its chunk. Both
    backends decode a pool in blocks of a fixed size (decode_block_bytes), so the decoder adds nothing per sample.

    Measured on the default model as the growth of resident memory (ru_maxrss) during a step of 20,000 samples,
    less decode_block_bytes (tests/engine/test_engine.py measures it again; benchmarks/RESULTS.md has the figures).
    """
    config = model.config
    element = torch.empty((), dtype=model.dtype).element_size()
    return 4 * config.noise_size + element * (8 * config.hidden_size + config.latent_size) + 4 * 8 * config.chunk_size


def decode_block_bytes(model: CalmModel) -> int:
    """Bytes of one block of the pool decode (ae_decode.decode_argmax_ref): ROW_BLOCK decoded rows through the
    autoencoder decoder (a gated MLP: 3 of width intermediate and 3 of width hidden live per row) and at most
    MAX_BLOCK_LOGITS logits with their running maximum. The C++ step's blocks of 64 samples are smaller."""
    ae = model.autoencoder.config
    element = torch.empty((), dtype=model.dtype).element_size()
    rows = ae_decode.ROW_BLOCK * element * 3 * (ae.hidden_size + ae.intermediate_size)
    return rows + 2 * 4 * ae_decode.MAX_BLOCK_LOGITS
