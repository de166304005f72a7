"""FelixLM: a Llama-style decoder (RMSNorm pre-norm, RoPE, SwiGLU, tied embeddings, no biases)
with SpliceCore surfaces on the MLP down-projection of every k-th layer.

Weights are laid out as in HF `LlamaForCausalLM` (rotate-half RoPE, q/k/v/o and gate/up/down
projections), so with SpliceCore at zero the two compute the same logits, and export to llama.cpp
is a renaming.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from felix.config import ModelConfig
from felix.splicecore import SpliceCore


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as Llama does) so bf16 training keeps the statistics exact.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) fp32, used in x's dtype (as HF Llama does): under bf16
    autocast the rotation stays in bf16 instead of promoting q and k to fp32 and back."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ w.T` against `targets`, without keeping fp32 logits.

    Row chunks of logits are made one at a time; each yields its log-sum-exp (fp32) and, at once,
    its gradient softmax - onehot, stored in h's dtype. Backward is then the same two matmuls the
    plain path runs (grad_h = g w, grad_w = g^T h). What goes away is the full-size fp32 logits
    copy, log-softmax output and its backward: 1.1-1.2x faster training steps on CPU and
    8 bytes x tokens x vocab less peak memory (docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, ignore_index: int):
        n = h.shape[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        g = torch.empty(n, w.shape[0], dtype=h.dtype, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = torch.mm(h[s:e], w.t(), out=g[s:e]).float()
            target_logit = logits.gather(1, safe[s:e]).squeeze(1)
            # softmax and log-sum-exp from one exp pass (logsumexp would make its own)
            peak = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(peak).exp_()
            norm = p.sum(dim=-1, keepdim=True)
            total += ((peak.squeeze(1) + norm.squeeze(1).log() - target_logit) * valid[s:e]).sum()
            # softmax - onehot; ignored rows are zeroed in backward, on (n, d) rather than (n, vocab)
            g[s:e] = p.div_(norm).scatter_add_(1, safe[s:e], torch.full_like(target_logit, -1.0)[:, None])
        count = valid.sum()
        ctx.save_for_backward(h, w, g, valid, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        h, w, g, valid, count = ctx.saved_tensors
        scale = (grad_out / count).to(g.dtype)
        keep = valid[:, None].to(g.dtype)
        grad_h = torch.mm(g, w).mul_(keep * scale) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(g.t(), h * keep).mul_(scale) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def loss_chunk_rows(vocab: int, device_type: str) -> int:
    """Rows of logits `linear_cross_entropy` makes at a time on a device type. CPU: 64-256 rows (~2M fp32
    logits) stay in cache (measured fastest on 2 EPYC cores at vocab 4K and 32K); GPUs want fewer, bigger
    chunks (32M logits = 128 MB at a time)."""
    return min(max(2**21 // vocab, 64), 256) if device_type == "cpu" else max(2**25 // vocab, 1)


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, w).float(), targets)` (mean over targets != ignore_index), fused.

    Under autocast the matmuls run in the autocast dtype, as `F.linear` would; the softmax is fp32.
    """
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, w = h.to(dtype), w.to(dtype)
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if chunk_rows is None:
        chunk_rows = loss_chunk_rows(w.shape[0], dev)
    chunk = max(1, min(chunk_rows, h.shape[0]))
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, w, targets, chunk, ignore_index)


class KVCache:
    """Preallocated keys/values for incremental decoding; `pos` is how many positions are filled."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k.to(cache.k.dtype), v.to(cache.v.dtype))
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask, causal = None, True
        if past and T == 1:
            causal = False  # one new query attends to everything cached
        elif past:
            # T new queries at positions past..past+T-1 over past+T keys.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU MLP, plus this layer's SpliceCore on the down-projection when it has one."""

    def __init__(self, cfg: ModelConfig, splice_rank: int = 0):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.splice = SpliceCore(cfg.d_ff, cfg.d_model, splice_rank) if splice_rank else None

    def down_input(self, x: torch.Tensor) -> torch.Tensor:
        """u, what the down-projection and the SpliceCore read (the MLP's "keys")."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.down_input(x)
        out = self.down_proj(u)
        if self.splice is not None:
            out = out + self.splice(u)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        rank = cfg.splice_rank if layer in cfg.splice_layers else 0
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, rank)

    def attend(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after this block's attention, before its MLP."""
        return x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer)

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        x = self.attend(x, cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class FelixLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.loss_chunk_rows: int | None = None  # None: `loss_chunk_rows` for the device the loss runs on
        self.prefix_memo = None  # a felix.prefix_memo.PrefixMemo serving no-grad forwards, while one is set
        self.reset_parameters()

    # -- construction -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual outputs scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        for block in self.layers:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(block.attn.o_proj.weight, std=out_std)
            nn.init.normal_(block.mlp.down_proj.weight, std=out_std)
            for norm in (block.attn_norm, block.mlp_norm):
                nn.init.ones_(norm.weight)
            if block.mlp.splice is not None:
                block.mlp.splice.reset_parameters()
        nn.init.ones_(self.norm.weight)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False,
                targets: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, vocab) for token ids (B, T); with `cache`, continue from `cache.pos`.

        With `targets` (B, T; -100 = ignore), return the mean next-token cross-entropy instead of
        logits, computed by `linear_cross_entropy` (fp32 softmax, no full logits tensor): the
        training path. `return_hidden=True` also returns the residual stream after each block.
        """
        hidden: list[torch.Tensor] | None = [] if return_hidden else None
        h = self.final_hidden(idx, cache, hidden)
        if targets is None:
            out = self.lm_head(h)
        else:
            out = linear_cross_entropy(h, self.tok_emb.weight, targets, chunk_rows=self.loss_chunk_rows)
        return (out, hidden) if return_hidden else out

    def final_hidden(self, idx: torch.Tensor, cache: KVCache | None = None,
                     hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, d) that the tied head reads; appends each block's
        residual output to `hidden` when given."""
        T = idx.shape[1]
        cos, sin = self._rope(cache.pos if cache is not None else 0, T)
        if self.prefix_memo is not None and cache is None and hidden is None and not torch.is_grad_enabled():
            return self.norm(self.prefix_memo.residual(self, idx, cos, sin))
        x = self.tok_emb(idx)
        for block in self.layers:
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def residual_through(self, idx: torch.Tensor, last_layer: int) -> torch.Tensor:
        """The residual stream (B, T, d) after block `last_layer`, running no later block nor the head:
        for reading inner activations (a hook on an earlier block) at a fraction of a full forward."""
        cos, sin = self._rope(0, idx.shape[1])
        if self.prefix_memo is not None and not torch.is_grad_enabled():
            return self.prefix_memo.residual(self, idx, cos, sin, stop=last_layer + 1)
        x = self.tok_emb(idx)
        for block in self.layers[: last_layer + 1]:
            x = block(x, cos, sin)
        return x

    def _rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables of positions start..start+n-1, which must be within max_seq_len."""
        if start + n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + n} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        return self.rope_cos[start : start + n], self.rope_sin[start : start + n]

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output projection: the token embedding matrix."""
        return F.linear(h, self.tok_emb.weight)

    # -- SpliceCore access -------------------------------------------------------------------
    def splice_cores(self) -> dict[int, SpliceCore]:
        return {b.layer: b.mlp.splice for b in self.layers if b.mlp.splice is not None}

    def splice_state(self) -> dict[str, torch.Tensor]:
        """Every SpliceCore tensor by its stable name (`layers.L.mlp.splice.{a,b,gate}`), copied."""
        out = {}
        for layer, core in self.splice_cores().items():
            for key in ("a", "b", "gate"):
                out[f"layers.{layer}.mlp.splice.{key}"] = getattr(core, key).detach().clone()
        return out

    @torch.no_grad()
    def load_splice_state(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Write SpliceCore tensors by name; shapes are checked before anything is written."""
        current = dict(self.named_parameters()) | dict(self.named_buffers())
        expected = self.splice_state().keys()
        unknown = [k for k in state if k not in expected]
        if unknown:
            raise KeyError(f"not SpliceCore tensors: {sorted(unknown)}")
        if strict and (missing := sorted(set(expected) - set(state))):
            raise KeyError(f"missing SpliceCore tensors: {missing}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(current[name].shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(current[name].shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: contains NaN or inf")
        for name, value in state.items():
            current[name].copy_(value.to(current[name].dtype))

    def splice_twin(self) -> FelixLM:
        """A copy that shares every tensor but SpliceCore's: a second SpliceCore state on the same weights
        (a server prepares a write there while completions read this one), at the cost of SpliceCore alone."""
        own = {id(t) for core in self.splice_cores().values() for t in (*core.parameters(), *core.buffers())}
        shared = {id(t): t for t in (*self.parameters(), *self.buffers()) if id(t) not in own}
        return copy.deepcopy(self, shared)

    # -- accounting ---------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_splice_params(self) -> int:
        return sum(p.numel() for core in self.splice_cores().values() for p in core.parameters())
