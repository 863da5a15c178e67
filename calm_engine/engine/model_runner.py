"""ModelRunner: the engine's fast forward passes over a CalmModel's weights, and the sampling step.

The reference model (calm_engine/model) is the specification; this file computes the same functions for the
engine's batches with fewer, larger operations:
- the backbone over per-request cache slots (`prefill` of right-padded prompts, `decode` of one chunk per row),
  with q/k/v and gate/up projections packed into single matmuls (the module parameters become views of the packed
  tensors, so no weight is stored twice) and a precomputed rotary table; this part is `BackboneRunner`, which the
  token-level baseline's runner (token_runner.py) shares;
- the energy head over a pool of S samples per row, computing the hidden-state embedding and the hidden-state half
  of every block's first linear once per row instead of S times (`head_pool`);
- the autoencoder decoder with the vocabulary projection and argmax done in blocks, so the [M*K, V] logits of
  a 200-sample pool never exist at once (`decode_argmax`, `project_argmax`);
- `sample_patches`: noise -> head -> decode -> likelihood-free choice, on device.
Every public method has a test against the reference model (tests/engine/test_model_runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calm_engine.engine.kv_cache import SlotKVCache
from calm_engine.engine.sampler import ExactState, approximate_choice, exact_choice
from calm_engine.engine.weights import GatedMLP, Linear, ModelWeights, Norm
from calm_engine.model.calm import CalmModel
from calm_engine.model.layers import ACTIVATION_FUNCTIONS, rms_norm
from calm_engine.model.llama import rotary_cos_sin
from calm_engine.model.token_llama import TokenLlama
from kernels import triton_available
from kernels.philox import uniform_noise, uniform_noise_ref

# The other kernel modules are imported where they are used: they import calm_engine.model themselves, and
# importing them here would make `import kernels.ae_decode` (first) and `import calm_engine` circular.

try:  # the optional C++ helpers of csrc/ (torch is imported first: both ship libgomp)
    from calm_engine import _calm_cpu
except ImportError:
    _calm_cpu = None

# A request's noise counter for step t, pool p and stream s (0: head noise, 1: choice uniforms) is
# t * COUNTERS_PER_STEP + 2 * p + s, so every draw of every request has its own Philox counter.
COUNTERS_PER_STEP = 64
MAX_POOLS = COUNTERS_PER_STEP // 2
# The vocabulary projection holds at most this many logits at once (16 MB in float32), in blocks of ROW_BLOCK rows.
LOGITS_PER_CHUNK = 1 << 22
ROW_BLOCK = 1024


@dataclass
class SamplingBatch:
    """Device tensors describing how each row of a step samples ([B] unless noted).

    seeds, steps: the request's seed and its generated-chunk index (the noise counter).
    valid [B, S]: which of the S pool samples a row uses (a T = 1 row uses sample 0 only).
    inv_floor, inv_frac: n and a of 1/T = n + a.
    pools: the exact sampler's bound per row; max_pools: its maximum over the batch (0: approximate sampling).
    """

    seeds: torch.Tensor
    steps: torch.Tensor
    valid: torch.Tensor
    inv_floor: torch.Tensor
    inv_frac: torch.Tensor
    pools: torch.Tensor
    max_pools: int


NoiseFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def philox_noise(seeds: torch.Tensor, counters: torch.Tensor, samples: int, dim: int) -> torch.Tensor:
    """The default noise: Philox4x32-10 uniforms on [-0.5, 0.5) keyed by (seed, counter), [R, samples, dim].

    The Triton kernel on CUDA, the C++ loop of csrc/ on CPU when it is built, else the torch reference; all three
    are bit-identical, so a seed gives the same noise on every device.
    """
    if seeds.is_cuda:
        return uniform_noise(seeds, counters, samples, dim)
    if _calm_cpu is not None and seeds.device.type == "cpu":
        return torch.from_numpy(_calm_cpu.philox_uniform(seeds.numpy(), counters.numpy(), samples, dim))
    return uniform_noise_ref(seeds, counters, samples, dim)


def _rms_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return rms_norm(x, norm.weight, norm.eps)  # half precision: the reference's normalise-then-scale order


def _layer_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _linear(x: torch.Tensor, linear: Linear) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _gated_mlp(x: torch.Tensor, mlp: GatedMLP) -> torch.Tensor:
    gate, up = _linear(x, mlp.gate_up).chunk(2, dim=-1)
    return _linear(ACTIVATION_FUNCTIONS[mlp.activation](gate) * up, mlp.down)


def project_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax(x @ weight.T, -1) for x [M, h], weight [V, h], holding at most LOGITS_PER_CHUNK logits at once.

    Small products run whole. Large ones (a 200-sample pool: M = 800 rows per request) run in blocks of ROW_BLOCK
    rows x a vocabulary slice, keeping a running maximum: blocking rows alone would re-read the whole [V, h] matrix
    (263 MB at CALM-M) for every few rows. A later slice wins only when strictly larger, so ties keep the first index,
    as torch.argmax does.
    """
    rows, vocab = x.shape[0], weight.shape[0]
    if rows * vocab <= LOGITS_PER_CHUNK:
        return _argmax_rows(F.linear(x, weight))
    row_block = min(rows, ROW_BLOCK)
    vocab_block = max(1, LOGITS_PER_CHUNK // row_block)
    ids = []
    for part in x.split(row_block):
        best_value = best_index = None
        for start in range(0, vocab, vocab_block):
            value, index = _max_rows(F.linear(part, weight[start : start + vocab_block]))
            if best_value is None:
                best_value, best_index = value, index
            else:
                better = value > best_value
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index + start, best_index)
        ids.append(best_index)
    return torch.cat(ids)


def _max_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, first argmax) over the last axis of [M, V]; on CPU through numpy's argmax (0.95 ms against torch's
    4.5 ms for 1024 x 4096 here, 15% of a CALM-M T = 0.5 step)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        index = torch.from_numpy(logits.numpy().argmax(-1))
        return logits.gather(-1, index[:, None])[:, 0], index
    return logits.max(-1)


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis, first index on ties. On CPU through numpy: torch's CPU argmax over a few rows of a
    large vocabulary is ~20x slower (68 us vs 3.4 us for 4 x 8192 here), and it runs every step."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class BackboneRunner:
    """The Llama backbone over the engine's cache slots: `prefill` and `decode` -> last hidden state [B, H].

    Shared by every model the engine drives; a subclass says how ids become backbone inputs (`compress`) and how the
    next ids are sampled from the hidden state (`sample_patches`). model needs `config` (the Llama fields plus
    patch_size), `backbone` (a LlamaBackbone), `device` and `dtype`.
    """

    def __init__(
        self,
        model: CalmModel | TokenLlama,
        cache: SlotKVCache,
        noise: NoiseFn = philox_noise,
        use_kernels: bool | None = None,
    ):
        self.model = model
        self.config = config = model.config
        self.cache = cache
        self.noise = noise
        # The Triton kernels (kernels/) replace their references on CUDA; tests force them on CPU under the
        # triton interpreter.
        self.use_kernels = (model.device.type == "cuda" and triton_available()) if use_kernels is None else use_kernels
        self.patch_size = config.patch_size
        self.weights = ModelWeights.of(model)
        self.layers = self.weights.backbone.layers
        positions = torch.arange(cache.capacity, device=model.device)[None]
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling, model.dtype)
        self.rope_cos, self.rope_sin = cos[0], sin[0]

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T*K] -> backbone inputs [B, T, hidden]."""
        raise NotImplementedError

    def sample_patches(
        self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, H] -> the next patch [B, K] of every row, and [B] bools: rows whose sampler fell back."""
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, chunk_lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts ids [B, T*K] with chunk_lengths [B] into cache slots [B] -> last real hidden [B, H].

        Positions 0..T-1 of each slot are written (a padded row's tail is garbage that later writes overwrite before
        anything reads it). Causal attention keeps every real position blind to the padding after it.
        """
        config = self.config
        batch = ids.shape[0]
        x = self.compress(ids)
        steps = x.shape[1]
        cos, sin = self.rope_cos[:steps][:, None], self.rope_sin[:steps][:, None]
        position_index = torch.arange(steps, device=ids.device)[None]
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm)
            q, k, v = _linear(h, layer.qkv).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q = _rotate(q.view(batch, steps, heads, dim), cos, sin)
            k = _rotate(k.view(batch, steps, kv_heads, dim), cos, sin)
            v = v.view(batch, steps, kv_heads, dim)
            self.cache.keys[i][slots[:, None], :, position_index] = k
            self.cache.values[i][slots[:, None], :, position_index] = v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )
            x = x + _linear(out.transpose(1, 2).reshape(batch, steps, -1), layer.o)
            x = x + _gated_mlp(_rms_norm(x, layer.post_norm), layer.mlp)
        last = x[torch.arange(batch, device=ids.device), chunk_lengths - 1]
        return _rms_norm(last, self.weights.backbone.norm)

    def decode(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attend: int,
        first_slot: int | None = None,
    ) -> torch.Tensor:
        """One chunk per row: ids [B, K] at chunk positions [B] into slots [B] -> hidden [B, H].

        `attend` bounds the keys read (at least max(positions) + 1; the CUDA graph passes the capacity), the mask
        keeps each row to its own length. `first_slot`, when the rows' slots are first_slot, first_slot + 1, ...,
        lets attention read the cache through a view instead of gathering the rows' keys.
        """
        config = self.config
        batch = ids.shape[0]
        x = self.compress(ids)[:, 0]
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        if not self.use_kernels:
            mask = (torch.arange(attend, device=ids.device)[None] <= positions[:, None])[:, None, None]
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm)
            qkv = _linear(h, layer.qkv).view(batch, heads + 2 * kv_heads, dim)
            qk = _rotate(qkv[:, : heads + kv_heads], cos, sin)  # q and k rotate together: half the ops
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys[slots, :, positions] = qk[:, heads:]
            values[slots, :, positions] = qkv[:, heads + kv_heads :]
            if self.use_kernels:  # reads each row's own length: no mask, no gather, graph-capturable
                from kernels import decode_attention

                out = decode_attention.decode_attention(
                    qk[:, :heads].contiguous(), keys, values, slots, positions + 1, dim**-0.5
                )
            else:
                if first_slot is None:
                    past_keys, past_values = keys[:, :, :attend][slots], values[:, :, :attend][slots]
                else:
                    rows = slice(first_slot, first_slot + batch)
                    past_keys, past_values = keys[rows, :, :attend], values[rows, :, :attend]
                out = F.scaled_dot_product_attention(
                    qk[:, :heads, None], past_keys, past_values, attn_mask=mask, enable_gqa=True
                )
            x = x + _linear(out.reshape(batch, -1), layer.o)
            x = x + _gated_mlp(_rms_norm(x, layer.post_norm), layer.mlp)
        return _rms_norm(x, self.weights.backbone.norm)


class ModelRunner(BackboneRunner):
    """A CalmModel's backbone (BackboneRunner), input compression, energy head, autoencoder decoder and sampler."""

    def __init__(
        self, model: CalmModel, cache: SlotKVCache, noise: NoiseFn = philox_noise, use_kernels: bool | None = None
    ):
        super().__init__(model, cache, noise, use_kernels)
        self.head = model.generative_head
        self.decoder = model.autoencoder.decoder

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T*K] -> backbone inputs [B, T, hidden]: each chunk's K embeddings concatenated and compressed."""
        batch = ids.shape[0]
        if self.use_kernels:
            from kernels import ae_encode

            flat = ids.reshape(-1, self.patch_size)
            return ae_encode.compress(self.model.embed_proj, self.model.backbone.embed_tokens.weight, flat).view(
                batch, flat.shape[0] // batch, -1
            )
        compression = self.weights.compression
        x = F.embedding(ids, self.weights.backbone.embed).reshape(batch, ids.shape[1] // self.patch_size, -1)
        x = F.silu(_linear(x, compression.first))
        return _layer_norm(_linear(x, compression.second), compression.norm)

    # ---- head and autoencoder ---------------------------------------------------------------------------------

    def head_pool(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [B, H], noise [B, S, noise_size] -> latents [B, S, latent]; per-row work done once per row."""
        head = self.weights.head
        condition = _layer_norm(_linear(hidden, head.hidden_embed), head.hidden_norm)
        x = _layer_norm(_linear(noise.to(hidden.dtype), head.noise_embed), head.noise_norm)
        for block in head.blocks:
            row_part = _linear(condition, block.hidden_half)[:, None]
            y = F.silu(_linear(_layer_norm(x, block.norm), block.noise_half) + row_part)
            y = F.silu(_linear(y, block.second))
            gate, up = _linear(y, block.third).chunk(2, dim=-1)
            x = x + _linear(F.silu(gate) * up, block.down)
        y = F.silu(_linear(_layer_norm(x, head.final_norm), head.final_first))
        return _linear(y, head.final_second)

    def decode_argmax(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [M, latent] -> greedy ids [M, K]; the vocabulary projection runs in blocks (project_argmax)."""
        if self.use_kernels:
            from kernels import ae_decode

            return ae_decode.decode_argmax(self.decoder, latents)[0]
        decoder = self.weights.decoder
        rows = latents.shape[0]
        x = _linear(latents, decoder.latent_to_hidden)
        for layer in decoder.layers[: decoder.stage]:
            x = x + _gated_mlp(_rms_norm(x, layer.norm), layer.mlp)
        x = _linear(x, decoder.expand).reshape(rows * self.patch_size, -1)
        for layer in decoder.layers[decoder.stage :]:
            x = x + _gated_mlp(_rms_norm(x, layer.norm), layer.mlp)
        x = _rms_norm(x, decoder.norm)
        return project_argmax(x, decoder.projection).view(rows, self.patch_size)

    # ---- sampling ---------------------------------------------------------------------------------------------

    def sample_pool(self, hidden: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, samples: int):
        """S head samples per row decoded to patches [B, S, K], with the noise of (seed, counter)."""
        if self.use_kernels and self.noise is philox_noise:  # the fused head draws the same noise in-kernel
            from kernels import energy_head

            latents = energy_head.energy_head(self.head, hidden, seeds, counters, samples)
        else:
            latents = self.head_pool(hidden, self.noise(seeds, counters, samples, self.config.noise_size))
        return self.decode_argmax(latents.reshape(-1, latents.shape[-1])).view(hidden.shape[0], samples, -1)

    def choice_uniforms(self, seeds: torch.Tensor, counters: torch.Tensor, samples: int) -> torch.Tensor:
        return self.noise(seeds, counters + 1, samples, 1)[..., 0] + 0.5

    def sample_patches(
        self, hidden: torch.Tensor, batch: SamplingBatch, allow_sync: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, H] -> the next patch [B, K] of every row, sampled as each row's parameters say, and [B] bools:
        rows whose exact sampler hit its bound and fell back to Algorithm 2.

        allow_sync lets the exact sampler stop early when every row has accepted (one host sync per pool; eager CPU
        only). Without it every pool up to the batch's bound runs, so the step has a fixed shape for CUDA graphs.
        """
        base = batch.steps * COUNTERS_PER_STEP
        samples = batch.valid.shape[1]
        pool = self.sample_pool(hidden, batch.seeds, base, samples)
        no_fallback = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        if samples == 1:
            return pool[:, 0], no_fallback
        uniforms = self.choice_uniforms(batch.seeds, base, samples)
        if batch.max_pools == 0:
            index = approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)
            return pool[torch.arange(pool.shape[0], device=pool.device), index], no_fallback
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        fallback = pool[rows, approximate_choice(pool, batch.valid, batch.inv_floor, batch.inv_frac, uniforms)]
        state = ExactState.start(hidden.shape[0], self.patch_size, hidden.device)
        for p in range(batch.max_pools):
            if p:
                counters = base + 2 * p
                pool = self.sample_pool(hidden, batch.seeds, counters, samples)
                uniforms = self.choice_uniforms(batch.seeds, counters, samples)
            live = batch.valid & (p < batch.pools)[:, None]
            state = exact_choice(state, pool, live, batch.inv_floor, batch.inv_frac, uniforms)
            if allow_sync and bool(state.done.all()):
                break
        # Rows that did not accept within their own bound take Algorithm 2's choice from their first pool.
        fell_back = ~state.done & (batch.pools > 0)
        return torch.where(state.done[:, None], state.chosen, fallback), fell_back
