"""The decoder LM: one `Block` for Llama, Qwen2, Phi-3 and Mistral checkpoints.

What differs between the four families is a handful of booleans and numbers in `LMConfig`, read from the
checkpoint's own config.json (see `hf.lm_config`): qkv bias, tied embeddings, partial rotary, the RoPE scaling
rule, a sliding window. The q/k/v and gate/up projections are fused into one matmul each; the weight loader
slices the checkpoint's separate tensors into them.

Attention has one entry point, `attention()`: flash-attn varlen on CUDA when it is installed, SDPA with an explicit
mask everywhere else. Both honour `document_ids`, so a packed row of several samples attends causally within
each sample only, and `position_ids` restart at 0 for each sample.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # the optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


@dataclass
class LMConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # MLP intermediate size
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets both biases
    o_bias: bool = False
    tie_embeddings: bool = False  # Qwen2.5 small models, SmolLM2
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3" | "longrope"
    rope_scaling: dict = field(default_factory=dict)  # the checkpoint's own rope parameters
    partial_rotary_factor: float = 1.0  # Phi-4-mini rotates 3/4 of each head
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral v0.1
    hidden_act: str = "silu"

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings, computed exactly as transformers does (fp32, rotate_half layout).

def rope_inv_freq(cfg: LMConfig, long: bool = False):
    """Inverse frequencies (rotary_dim/2,) and the attention scaling applied to cos/sin."""
    dim, rs = cfg.rotary_dim, cfg.rope_scaling
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_type == "linear":
        return inv_freq / rs["factor"], 1.0
    if cfg.rope_type == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if cfg.rope_type == "longrope":
        old_len = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or cfg.max_position_embeddings / old_len
        scale = rs.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len)))
        ext = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32)
        return inv_freq / ext, scale
    return inv_freq, 1.0


class Rotary(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.rotary_dim // 2), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(cfg.rotary_dim // 2), persistent=False)

    def init_weights(self):
        self.inv_freq.copy_(rope_inv_freq(self.cfg)[0])
        self.inv_freq_long.copy_(rope_inv_freq(self.cfg, long=True)[0])
        self.scale = rope_inv_freq(self.cfg)[1]

    def forward(self, position_ids):  # (B, T) -> cos, signed sin: (B, T, 1, rotary_dim), fp32
        inv_freq = self.inv_freq
        if self.cfg.rope_type == "longrope":  # like transformers: long factors once positions pass the old length
            old_len = self.cfg.rope_scaling["original_max_position_embeddings"]
            if int(position_ids.max()) + 1 > old_len:
                inv_freq = self.inv_freq_long
        freqs = position_ids[..., None, None].float() * inv_freq.float()  # (B, T, 1, rotary_dim/2)
        cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
        # transformers rotates with cat(-x2, x1) * cat(sin, sin); we use roll(x) = cat(x2, x1) times cat(-sin, sin):
        # the same products, one copy instead of two slices, a negation and a cat per q and k in every layer
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x, cos, sin):  # x: (B, T, H, head_dim); cos, signed sin from Rotary; rotary_dim channels rotate
    d = cos.shape[-1]
    if d < x.shape[-1]:  # partial rotary (Phi-4-mini): the other channels pass through
        rot, keep = x.split([d, x.shape[-1] - d], dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin), keep), dim=-1)
    return x * cos.to(x.dtype) + x.roll(d // 2, dims=-1) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention: one dispatch function.

@dataclass
class AttnMeta:
    """What attention needs to know about the rows, computed once per forward, shared by all layers."""
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool for SDPA, or None for plain causal
    cu_seqlens: torch.Tensor | None = None  # flash-attn varlen: (n_docs + 1,) int32 over the flattened rows
    max_seqlen: int = 0


def attention_meta(document_ids, q_slots, k_slots, k_document_ids, window, use_flash):
    """document_ids: (B, T) of the queries; k_document_ids: (B, S) of the keys (== document_ids without a cache).
    q_slots / k_slots: (T,) / (S,) absolute positions in the row, for causality and the sliding window."""
    if use_flash:  # one varlen segment per document: a new segment wherever the document id changes
        flat = document_ids.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts.view(document_ids.shape)[:, 0] = True  # rows never share a segment
        lengths = torch.diff(torch.nonzero(torch.cat([starts, starts.new_ones(1)])).flatten())
        cu = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        return AttnMeta(cu_seqlens=cu, max_seqlen=int(lengths.max()))
    if (document_ids is not None and k_document_ids is document_ids and document_ids.device.type == "cpu"
            and not document_ids.any()):  # (with a cache, the keys can hold left padding: -1)
        document_ids = None  # one sample per row, no padding: SDPA's causal kernel is ~1.4x faster than a mask
    if document_ids is None and window is None and q_slots.shape[0] == k_slots.shape[0]:
        return AttnMeta()  # plain causal: SDPA's is_causal path
    allowed = q_slots[:, None] >= k_slots[None, :]  # (T, S)
    if window is not None:
        allowed = allowed & (q_slots[:, None] - k_slots[None, :] < window)
    allowed = allowed[None, None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == k_document_ids[:, None, None, :])
    return AttnMeta(mask=allowed)


def attention(q, k, v, meta: AttnMeta, window=None):
    """q: (B, T, H, hd), k/v: (B, S, KV, hd) -> (B, T, H, hd)."""
    if meta.cu_seqlens is not None:  # CUDA + flash-attn, training/prefill without a cache
        B, T, H, hd = q.shape
        out = flash_attn_varlen_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), meta.cu_seqlens, meta.cu_seqlens,
            meta.max_seqlen, meta.max_seqlen, causal=True,
            window_size=(window - 1, 0) if window else (-1, -1))
        return out.view(B, T, H, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, is_causal=meta.mask is None,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):  # in fp32, as transformers does, then back to the input dtype before the weight
        # F.rms_norm: one fused kernel, bit-identical here to transformers' pow/mean/rsqrt/mul and ~2x faster on CPU
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, cos, sin, meta, cache=None):
        B, T, _ = x.shape
        H, KV, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = apply_rotary(q.view(B, T, H, hd), cos, sin)
        k = apply_rotary(k.view(B, T, KV, hd), cos, sin)
        v = v.view(B, T, KV, hd)
        if cache is not None:
            k, v = cache.update(k, v)
        out = attention(q, k, v, meta, self.cfg.sliding_window)  # (B, T, H, hd)
        return self.o(out.reshape(B, T, H * hd))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)  # [gate; up], Phi-3's own layout
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, meta, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, meta, cache)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Keys/values of every layer for generation: (B, S_max, KV, hd) each, allocated at the first update in the
    dtype the layers compute in (bf16 under mixed precision, whatever the parameters are stored in)."""

    def __init__(self, cfg: LMConfig, batch_size, max_len, device):
        self.shape = (batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k, self.v = [None] * cfg.n_layers, [None] * cfg.n_layers
        self.document_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0  # slots filled by completed forwards
        self.layer = 0

    def update(self, k, v):  # called by each layer in turn; returns the keys/values up to the new length
        i, end = self.layer, self.length + k.shape[1]
        if self.k[i] is None:
            self.k[i], self.v[i] = k.new_zeros(self.shape), v.new_zeros(self.shape)
        self.k[i][:, self.length:end] = k
        self.v[i][:, self.length:end] = v
        self.layer = (i + 1) % len(self.k)
        return self.k[i][:, :end], self.v[i][:, :end]

    def repeat(self, n, max_len):
        """A cache holding each row of this one n times over (b0, b0, .., b1, ..) with room for max_len positions:
        to continue one prompt in n ways (scoring candidate answers) without running the prompt n times."""
        def grow(t):  # (B, S, ...) -> (B * n, max_len, ...), the first `length` slots copied
            out = t.new_zeros(t.shape[0] * n, max_len, *t.shape[2:])
            out[:, :self.length] = t[:, :self.length].repeat_interleave(n, 0)
            return out
        new = KVCache.__new__(KVCache)
        new.shape, new.length, new.layer = (self.shape[0] * n, max_len, *self.shape[2:]), self.length, 0
        new.k = [None if t is None else grow(t) for t in self.k]
        new.v = [None if t is None else grow(t) for t in self.v]
        new.document_ids = grow(self.document_ids)
        return new


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = Rotary(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False

    def init_weights(self):
        """Non-persistent buffers (RoPE). Weights come from the checkpoint (`hf.load_lm`)."""
        self.rotary.init_weights()

    def logits(self, h):
        return F.linear(h, self.embed.weight if self.head is None else self.head.weight)

    def forward(self, x, position_ids=None, document_ids=None, cache: KVCache | None = None):
        """x: input embeddings (B, T, D) -> final-norm hidden states (B, T, D).
        position_ids (B, T): per-sample positions (default 0..T-1); document_ids (B, T): which sample of the row
        each token belongs to (padding is a document of its own), None for one sample per row."""
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        q_slots = torch.arange(start, start + T, device=x.device)
        if position_ids is None:
            position_ids = q_slots[None].expand(B, T)
        k_document_ids, k_slots = document_ids, q_slots
        if cache is not None:
            if document_ids is not None:
                cache.document_ids[:, start:start + T] = document_ids
                k_document_ids = cache.document_ids[:, :start + T]
            k_slots = torch.arange(start + T, device=x.device)
        use_flash = (flash_attn_varlen_func is not None and x.is_cuda and cache is None
                     and x.dtype in (torch.bfloat16, torch.float16))
        if use_flash and document_ids is None:
            document_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        meta = attention_meta(document_ids, q_slots, k_slots, k_document_ids, self.cfg.sliding_window, use_flash)
        cos, sin = self.rotary(position_ids)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, meta, use_reentrant=False)
            else:
                x = layer(x, cos, sin, meta, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)
