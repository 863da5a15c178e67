"""LLMEngine, the step-level API for embedding the engine, and LLM, the offline batch API built on it.

    engine = LLMEngine(model)                    # or LLM(...).engine
    engine.add_request("a", "Once upon", SamplingParams(temperature=0.5, seed=1))
    while engine.has_unfinished_requests():
        for out in engine.step():                # new ids of every running request (streaming)
            ...
    engine.abort("a")

Prompts of any length: the model reads whole K-token chunks. The official rule ("right", default) pads the last
partial chunk of the prompt with the pad id on the right, feeds the pads like tokens, and drops pad ids from the
output. "left" pads the first chunk on the left instead, so the prompt's last real token is the last thing the model
reads before generating (the pads then sit where a document boundary would). Generated pad ids are fed back but not
reported, as the official generate does.

A token-level Llama (model/token_llama.py, the K = 1 baseline) runs through the same engine with a TokenModelRunner:
chunks are single tokens, and every step samples one token per request at its temperature (Gumbel-max over the
logits); SamplingParams' num_samples, sampler and exact_max_pools do not apply to it.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from calm_engine.engine.cpu_step import CpuDecodeStep
from calm_engine.engine.cpu_step import available as cpu_step_available
from calm_engine.engine.cpu_step import resolve_isa as resolve_cpu_isa
from calm_engine.engine.cuda_graph import CudaGraphCapture, DecodeGraphRunner, EagerCapture, default_buckets
from calm_engine.engine.kv_cache import SlotKVCache, capacity_for
from calm_engine.engine.model_runner import MAX_POOLS, ModelRunner, NoiseFn, SamplingBatch, philox_noise
from calm_engine.engine.request import Request, RequestOutput
from calm_engine.engine.scheduler import Scheduler
from calm_engine.engine.token_runner import TokenModelRunner
from calm_engine.model.calm import CalmModel
from calm_engine.model.token_llama import TokenLlama
from calm_engine.sampling_params import SamplingParams

PROMPT_PADDING = ("right", "left")
# Up to this many rows the C++ step beats the PyTorch path (small shape, 2 threads, generate of 64 tokens, the two
# alternated: 2.17x at 16 rows, 1.66x at 32, 1.33x at 64; benchmarks/RESULTS.md). Larger batches were not measured.
CPU_STEP_MAX_BATCH = 64
# Prefills of at most this many chunks in all run as the C++ step too; above it the PyTorch path's threaded attention
# and large products win (first step, small shape, 2 threads, C++ / PyTorch: 1 x 128 chunks 12.2 / 15.4 ms, 2 x 128
# 23.7 / 24.8, 4 x 128 50.2 / 44.5, 8 x 128 94.6 / 67.4; benchmarks/prefill_ab.py).
CPU_PREFILL_MAX_CHUNKS = 256
# Default budget for one step's pool of head samples (the rows of a step times the largest num_samples among them;
# see sample_row_bytes). 2 GiB holds 64 requests x 200 samples of the default model (0.7 GiB) and of CALM-M (1.5 GiB),
# and refuses at once what would otherwise run for minutes and exhaust memory (as reported in issue 16, one request of
# 100,000 samples on the default model ran 100 s and took 5.4 GB).
SAMPLE_POOL_MEMORY = 2 << 30


class LLMEngine:
    """Continuous batching over up to `max_batch_size` concurrent requests, each in its own KV-cache slot.

    One `step()` admits waiting requests into free slots (prefilled together, eagerly), decodes one chunk for every
    running request (replayed from a CUDA graph on GPUs), samples every row's next K tokens on the device and copies
    them to the host once.

    sample_pool_memory bounds the bytes of one step's head samples (its rows x the largest num_samples among them x
    sample_row_bytes); add_request refuses a request with which a step could exceed it.
    """

    def __init__(
        self,
        model: CalmModel | TokenLlama,
        *,
        max_batch_size: int = 64,
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        sample_pool_memory: int = SAMPLE_POOL_MEMORY,
        prompt_padding: str = "right",
        noise: NoiseFn | None = None,
        seed: int | None = None,
        use_cuda_graph: bool | None = None,
        cuda_graph_buckets: list[int] | None = None,
        use_cpu_step: bool = True,
        cpu_isa: str | None = None,
    ):
        """cpu_isa: the C++ step's instruction-set level, one of cpu_step.ISA_LEVELS ("generic", "avx2", "avx512",
        "avx512_bf16", "amx"); None takes $CALM_CPU_ISA, else the highest the CPU runs (cpu_step.CpuDecodeStep's
        `isa`). From "avx2" up the step keeps packed copies of the weights (their size again); "generic" keeps
        torch's sgemm. A name the CPU cannot run is a ValueError naming the levels it can."""
        if prompt_padding not in PROMPT_PADDING:
            raise ValueError(f"prompt_padding must be one of {list(PROMPT_PADDING)}, got {prompt_padding!r}")
        if isinstance(sample_pool_memory, bool) or not isinstance(sample_pool_memory, int) or sample_pool_memory < 1:
            raise ValueError(f"sample_pool_memory must be a positive number of bytes, got {sample_pool_memory!r}")
        self.model = model
        self.config = model.config
        self.patch_size = model.config.patch_size
        self.prompt_padding = prompt_padding
        capacity = capacity_for(model.config, max_model_len)
        self.cache = SlotKVCache(model.config, max_batch_size, capacity, model.device, model.dtype, kv_cache_memory)
        runner_class = TokenModelRunner if isinstance(model, TokenLlama) else ModelRunner
        self.runner = runner_class(model, self.cache, noise or philox_noise)
        self.scheduler = Scheduler(max_batch_size)
        self.max_batch_size = max_batch_size
        self.sample_pool_memory = sample_pool_memory
        # A token-level model draws one token per row whatever num_samples says: no pool.
        self.sample_row_bytes = sample_row_bytes(model) if isinstance(self.runner, ModelRunner) else 0
        # T = 1 decode steps of a float32 CALM model on CPU run as one C++ call when csrc/ is built (cpu_step.py).
        if cpu_isa is not None:
            resolve_cpu_isa(cpu_isa, "cpu_isa")  # a bad level is an error even where the C++ step does not run
        use_cpu_step = use_cpu_step and isinstance(self.runner, ModelRunner) and cpu_step_available(self.runner)
        self.cpu_step = CpuDecodeStep(self.runner, isa=cpu_isa) if use_cpu_step else None
        if use_cuda_graph is None:
            use_cuda_graph = model.device.type == "cuda"
        self.graphs = None
        if use_cuda_graph:  # on CPU this replays eagerly through the same buffers (tests of the graph runner)
            capture = CudaGraphCapture() if model.device.type == "cuda" else EagerCapture()
            buckets = cuda_graph_buckets or default_buckets(max_batch_size)
            self.graphs = DecodeGraphRunner(self.runner, buckets, capture)
        self.requests: dict[str, Request] = {}
        self._seed_source = random.Random(seed)
        self._eos_ids = set(model.config.eos_token_ids)
        self.stats = {"steps": 0, "prefill_rows": 0, "decode_rows": 0, "exact_fallbacks": 0}

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
        if params.exact_max_pools > MAX_POOLS:
            raise ValueError(f"exact_max_pools must be at most {MAX_POOLS}, got {params.exact_max_pools}")
        self._check_sample_pool(params)
        prompt_ids = self._prompt_ids(prompt)
        fed = self._pad_prompt(prompt_ids)
        chunks = len(fed) // self.patch_size
        if chunks > self.cache.capacity:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens ({chunks} chunks of K={self.patch_size}) is longer than "
                f"max_model_len ({self.cache.capacity * self.patch_size} tokens)"
            )
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        stop_ids = set(params.stop_token_ids) if params.ignore_eos else self._eos_ids | set(params.stop_token_ids)
        request = Request(request_id, prompt_ids, fed, params, seed, self.patch_size, frozenset(stop_ids))
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
        running = sorted(self.scheduler.running.values(), key=lambda r: r.slot)  # slot order: see _decode
        admitted = self.scheduler.admit()
        if not running and not admitted:
            return []
        cpu = self.model.device.type == "cpu"  # host syncs cost nothing there: the exact sampler may stop early
        results = []  # (patches [B, K], exact-sampler fallbacks [B] or None where there is no such sampler)
        if admitted and self._use_cpu_prefill(admitted):
            self.stats["prefill_rows"] += len(admitted)
            keys = torch.tensor([[r.seed, r.chunks_done] for r in admitted])  # the noise's (seed, step)
            prompts, slots = [r.fed_prompt for r in admitted], [r.slot for r in admitted]
            results.append((self.cpu_step.prefill(prompts, slots, keys[:, 0], keys[:, 1]), None))
        elif admitted:
            hidden = self._prefill(admitted)
            results.append(self.runner.sample_patches(hidden, self._sampling_batch(admitted), allow_sync=cpu))
        if running:
            results.append(self._decode(running, cpu))
        rows = admitted + running
        patches = torch.cat([p for p, _ in results]) if len(results) > 1 else results[0][0]
        self.stats["steps"] += 1
        if all(f is None for _, f in results):
            host = patches.tolist()
        else:
            flags = [torch.zeros(len(p), dtype=torch.bool, device=p.device) if f is None else f for p, f in results]
            fell_back = torch.cat(flags)
            host = torch.cat([patches, fell_back[:, None].to(patches.dtype)], dim=1).tolist()  # the step's one copy
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
        rows = min(self.max_batch_size, len(self.requests) + 1)
        needed = rows * samples * self.sample_row_bytes
        if needed <= self.sample_pool_memory:
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
            f"sample pool budget sample_pool_memory={self.sample_pool_memory / 2**30:.1f} GiB: {fix}"
        )

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.model.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, and this model has none: pass token ids")
            _check_text(prompt)
            ids = self.model.tokenizer.encode(prompt)
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError(
                f"the prompt is {type(prompt).__name__} ({_short(prompt)}): decode it to a str for text, "
                "or pass a list of token ids"
            )
        elif isinstance(prompt, (torch.Tensor, np.ndarray)):
            if prompt.ndim != 1:
                raise ValueError(f"a prompt of token ids must be 1-D, got shape {list(prompt.shape)}")
            ids = prompt.tolist()
        elif isinstance(prompt, Iterable):
            ids = list(prompt)
        else:
            raise TypeError(f"a prompt must be a str or a sequence of token ids, got {_short(prompt)}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.vocab_size
        for token in ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab:
                raise ValueError(f"prompt token {token!r} is not an id in the vocabulary [0, {vocab})")
        return [int(token) for token in ids]

    def _pad_prompt(self, ids: list[int]) -> list[int]:
        missing = -len(ids) % self.patch_size
        if not missing:
            return ids
        pad = self.config.pad_token_id
        if pad is None:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, not a multiple of K={self.patch_size}, and the model config has "
                "no pad_token_id to fill its partial chunk: give a prompt of whole chunks"
            )
        return ids + [pad] * missing if self.prompt_padding == "right" else [pad] * missing + ids

    def _prefill(self, requests: list[Request]) -> torch.Tensor:
        device = self.model.device
        longest = max(len(r.fed_prompt) for r in requests)
        pad = self.config.pad_token_id or 0
        ids = torch.tensor([r.fed_prompt + [pad] * (longest - len(r.fed_prompt)) for r in requests], device=device)
        lengths = torch.tensor([r.prompt_chunks for r in requests], device=device)
        slots = torch.tensor([r.slot for r in requests], device=device)
        self.stats["prefill_rows"] += len(requests)
        return self.runner.prefill(ids, lengths, slots)

    def _decode(self, requests: list[Request], cpu: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode the running requests' last chunks and sample their next ones (through a CUDA graph if any)."""
        self.stats["decode_rows"] += len(requests)
        if self._use_cpu_step(requests):  # the C++ step needs only the noise keys, not a whole SamplingBatch
            k = self.patch_size  # one numpy array for all the step's inputs: a step at batch 1 lasts ~0.7 ms
            rows = np.array([[*r.last_chunk, r.next_position, r.slot, r.seed, r.chunks_done] for r in requests])
            return self.cpu_step.run(rows[:, :k], rows[:, k], rows[:, k + 1], rows[:, k + 2], rows[:, k + 3]), None
        device = self.model.device
        ids = torch.tensor([r.last_chunk for r in requests], device=device)
        positions_list = [r.next_position for r in requests]
        positions = torch.tensor(positions_list, device=device)
        slot_list = [r.slot for r in requests]
        slots = torch.tensor(slot_list, device=device)
        batch = self._sampling_batch(requests)
        if self.graphs is not None and self.graphs.can_run(len(requests)):
            return self.graphs.run(ids, positions, slots, batch)
        # Rows in consecutive slots let attention read the cache as a view, without a gather.
        first_slot = slot_list[0] if slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list))) else None
        hidden = self.runner.decode(ids, positions, slots, attend=max(positions_list) + 1, first_slot=first_slot)
        return self.runner.sample_patches(hidden, batch, allow_sync=cpu)

    def _use_cpu_step(self, requests: list[Request]) -> bool:
        return (
            self.cpu_step is not None
            and self.graphs is None
            and len(requests) <= CPU_STEP_MAX_BATCH
            and all(r.params.samples_per_step == 1 for r in requests)
        )

    def _use_cpu_prefill(self, requests: list[Request]) -> bool:
        return self._use_cpu_step(requests) and sum(r.prompt_chunks for r in requests) <= CPU_PREFILL_MAX_CHUNKS

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        device = self.model.device
        token_model = isinstance(self.runner, TokenModelRunner)  # one sample per step whatever the temperature
        per_row_list = [1 if token_model else r.params.samples_per_step for r in requests]
        samples = max(per_row_list)
        per_row = torch.tensor(per_row_list, device=device)
        valid = torch.arange(samples, device=device)[None] < per_row[:, None]
        exact = [
            r.params.exact_max_pools
            if r.params.sampler == "exact" and r.params.temperature < 1 and not token_model
            else 0
            for r in requests
        ]
        return SamplingBatch(
            seeds=torch.tensor([r.seed for r in requests], device=device),
            steps=torch.tensor([r.chunks_done for r in requests], device=device),
            valid=valid,
            inv_floor=torch.tensor([r.params.inverse_floor for r in requests], device=device),
            inv_frac=torch.tensor(
                [max(0.0, r.params.inverse_temperature - r.params.inverse_floor) for r in requests],
                device=device,
                dtype=torch.float64,
            ),
            pools=torch.tensor(exact, device=device),
            max_pools=max(exact),
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
    default model. Remaining keywords
    go to LLMEngine (max_batch_size, max_model_len, kv_cache_memory, prompt_padding, noise, seed, use_cuda_graph,
    cuda_graph_buckets, use_cpu_step, cpu_isa, sample_pool_memory).
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
            from calm_engine.model.checkpoint import load

            model = load(model, device=device, dtype=dtype, tokenizer=tokenizer)
        self.model = model
        self.engine = LLMEngine(model, **engine_options)

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
        prompts = _prompt_list(prompts)
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


def _prompt_list(prompts) -> list:
    """LLM.generate's prompts argument as a list of single prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        if prompts.ndim == 1:
            return [prompts]
        if prompts.ndim == 2:
            return list(prompts)
        raise ValueError(
            f"prompts as a tensor must be 1-D (one prompt) or 2-D (a prompt per row), got shape {list(prompts.shape)}"
        )
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError(
            f"prompts is {type(prompts).__name__} ({_short(prompts)}): decode it to a str for text, or "
            "pass a list of token ids"
        )
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of those, got {_short(prompts)}")
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], numbers.Integral) and not isinstance(prompts[0], bool):
        return [prompts]  # a list of ids is one prompt
    return prompts


def _check_text(text: str) -> None:
    """Text the tokenizer can take: a lone surrogate (e.g. from bytes decoded with errors="surrogateescape") is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the prompt is not valid text: {text[error.start]!r} at index {error.start} is a lone surrogate "
            f"(U+{ord(text[error.start]):04X}), which no UTF-8 text holds"
        ) from None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_row_bytes(model: CalmModel) -> int:
    """Bytes one head sample holds at the peak of a sampling step, from the shapes: its noise (float32), the head's
    live activations (about 8 of width hidden_size), the autoencoder decoder's over its K tokens (a gated MLP: 3 of
    width intermediate and 3 of width hidden per token) and the sampler's int64 copies of the patch.

    Measured on the default model as the growth of resident memory during a step with a pool of 5,000 to 20,000
    samples: 50-68 KB per sample over six runs; this gives 55 KB (tests/engine/test_engine.py measures it again).
    """
    config, ae = model.config, model.autoencoder.config
    element = torch.empty((), dtype=model.dtype).element_size()
    head = 8 * config.hidden_size + config.latent_size
    decoder = 3 * ae.hidden_size + config.patch_size * 3 * (ae.hidden_size + ae.intermediate_size)
    return 4 * config.noise_size + element * (head + decoder) + 4 * 8 * config.patch_size
