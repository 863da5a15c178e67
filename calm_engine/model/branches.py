"""Teacher-forced branches for BrierLM: from every position of a block, a short continuation extended one input at
a time, attending to the block's cached keys and to its own, without copying the block's cache per branch.

Its attention is its own on purpose: each branch sees a different prefix of the shared block plus its own inputs (a
tree, not a sequence), which the backbone's causal attention over one cache cannot express without materialising a
cache per branch.
"""

from __future__ import annotations

import torch

from calm_engine.model.llama import KVCache, LlamaBackbone, apply_rotary, rotary_cos_sin


class BranchedContinuations:
    """Continuations that branch off positions start..stop-1 of every row of a teacher-forced block, extended
    together one input at a time.

    The j-th input of branch p sits at position p + j and attends to the block's keys at positions 0..p and to the
    branch's own earlier inputs: what running the row's first p + 1 positions plus the branch's inputs through the
    model computes, without copying the block's KV cache for each branch.
    """

    def __init__(self, backbone: LlamaBackbone, cache: KVCache, start: int, stop: int, max_steps: int):
        if not 0 <= start < stop <= cache.length:
            raise ValueError(f"branch positions {start}..{stop - 1} must lie in the cached 0..{cache.length - 1}")
        self.backbone = backbone
        self.start, self.stop, self.max_steps = start, stop, max_steps
        self.block_keys = [k[:, :, :stop] for k in cache.keys]
        self.block_values = [v[:, :, :stop] for v in cache.values]
        device = cache.keys[0].device
        # Branch p (row p - start) sees block positions 0..p.
        self.block_mask = torch.arange(stop, device=device) <= torch.arange(start, stop, device=device)[:, None]
        batch, kv_heads, _, head_dim = cache.keys[0].shape
        shape = (batch, kv_heads, stop - start, max_steps, head_dim)
        self.keys = [torch.zeros(shape, dtype=cache.keys[0].dtype, device=device) for _ in cache.keys]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.steps = 0

    def extend(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The next input of every branch [B, stop - start, hidden] -> its normed hidden state, same shape."""
        if self.steps == self.max_steps:
            raise ValueError(f"the branches were sized for {self.max_steps} steps")
        self.steps += 1
        config = self.backbone.config
        positions = torch.arange(self.start, self.stop, device=inputs_embeds.device)[None] + self.steps
        cos, sin = rotary_cos_sin(
            positions, config.head_dim, config.rope_theta, config.rope_scaling, inputs_embeds.dtype
        )
        x = inputs_embeds
        for index, layer in enumerate(self.backbone.layers):
            x = x + self._attention(index, layer.self_attn, layer.input_layernorm(x), cos, sin)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.backbone.norm(x)

    def _attention(self, index, attn, x, cos, sin) -> torch.Tensor:
        batch, branches, _ = x.shape
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = attn.q_proj(x).view(batch, branches, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, branches, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, branches, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        step = self.steps
        self.keys[index][:, :, :, step - 1] = k
        self.values[index][:, :, :, step - 1] = v
        # Scores against the shared block keys and against each branch's own keys, one softmax over both.
        # Query heads are grouped by their key-value head: q [B, kv_heads, groups, branches, D].
        q = q.reshape(batch, kv_heads, heads // kv_heads, branches, head_dim).float() * head_dim**-0.5
        block_keys = self.block_keys[index][:, :, None].float()
        own_keys = self.keys[index][:, :, :, :step].float()
        block_scores = (q @ block_keys.transpose(-1, -2)).masked_fill(~self.block_mask, float("-inf"))
        own_scores = torch.einsum("bkgpd,bkpjd->bkgpj", q, own_keys)
        weights = torch.cat((block_scores, own_scores), dim=-1).softmax(dim=-1)
        block_weights, own_weights = weights.split((self.stop, step), dim=-1)
        out = block_weights @ self.block_values[index][:, :, None].float()
        out = out + torch.einsum("bkgpj,bkpjd->bkgpd", own_weights, self.values[index][:, :, :, :step].float())
        out = out.reshape(batch, heads, branches, head_dim).to(x.dtype)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, branches, heads * head_dim))
