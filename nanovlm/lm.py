"""The decoder LM: one `Block` for Llama, Qwen2, Phi-3 and Mistral checkpoints.

What differs between the four families is a handful of booleans and numbers in `LMConfig`, read from the
checkpoint's own config.json (see `hf.lm_config`): qkv bias, tied embeddings, partial rotary, the RoPE scaling
rule, a sliding window. The q/k/v and gate/up projections are fused into one matmul each; the weight loader
slices the checkpoint's separate tensors into them.

Attention has one entry point, `attention()`. Packed training rows on CUDA go through a variable-length kernel
(flash-attn 2 when installed, else PyTorch's own `torch.nn.attention.varlen`): no mask, no padding FLOPs, GQA
without repeating K/V. Everywhere else (CPU, fp32, a KV cache) SDPA with an explicit boolean mask. All honour
`document_ids`, so a packed row of several samples attends causally within each sample only, and `position_ids`
restart at 0 for each sample. The KV cache (`Cache`) keeps a fill level per row, so rows of any length decode
together without left padding, and a prompt can be continued with many candidate answers in one row.
"""

import inspect
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
try:  # PyTorch's own flash-attention varlen kernel (CUDA); its keywords changed between releases
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
    _keywords = inspect.signature(torch_varlen_attn).parameters
    TORCH_VARLEN_GQA, TORCH_VARLEN_WINDOW = "enable_gqa" in _keywords, "window_size" in _keywords  # 2.11+
except ImportError:
    torch_varlen_attn, TORCH_VARLEN_GQA, TORCH_VARLEN_WINDOW = None, False, False


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
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool for SDPA; None: plain causal (or varlen)
    cu_seqlens: torch.Tensor | None = None  # varlen kernels: (segments + 1,) int32 over the flattened rows
    slots: torch.Tensor | None = None  # with a KV cache: (B, T) cache slots the new tokens go to
    end: int = 0  # with a KV cache: slots [0, end) hold the keys attended to


def varlen_kernel(x):
    """The variable-length kernel a packed training forward of x can use, or None (then SDPA with a mask). Only on
    CUDA in half precision: flash-attn 2 when installed, else PyTorch's own (torch.nn.attention.varlen, 2.10+)."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    return flash_attn_varlen_func or torch_varlen_attn


def attention_meta(document_ids, T, window, varlen):
    """Training and full forwards, no cache. document_ids (B, T): which sample of the row each token is (-1:
    padding) or None for one sample per row (not with varlen); window: Mistral's sliding window, or None."""
    if window is not None and T <= window:
        window = None  # no key is that far from its query
    if varlen:  # one segment per document: a new segment wherever the document id changes, and at every row
        flat = document_ids.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts.view(-1, T)[:, 0] = True
        cu = torch.nonzero(torch.cat([starts, starts.new_ones(1)])).flatten().to(torch.int32)
        return AttnMeta(cu_seqlens=cu)
    if document_ids is not None and document_ids.device.type == "cpu" and not document_ids.any():
        document_ids = None  # one sample per row, no padding: SDPA's causal kernel is ~1.4x faster than a mask
    if document_ids is None and window is None:
        return AttnMeta()  # plain causal: SDPA's is_causal path
    slots = torch.arange(T, device=document_ids.device if document_ids is not None else None)
    allowed = slots[:, None] >= slots[None, :]  # (T, T)
    if window is not None:
        allowed = allowed & (slots[:, None] - slots[None, :] < window)
    allowed = allowed[None, None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return AttnMeta(mask=allowed)


def _torch_varlen(q, k, v, cu, T, left):
    """torch.nn.attention.varlen across releases: 2.10 has is_causal and neither GQA nor a window."""
    if not TORCH_VARLEN_GQA and k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    if not TORCH_VARLEN_WINDOW:
        if left != -1:
            raise RuntimeError("this PyTorch's varlen_attn has no sliding window: pip install flash-attn")
        return torch_varlen_attn(q, k, v, cu, cu, T, T, is_causal=True)
    gqa = dict(enable_gqa=k.shape[1] != q.shape[1]) if TORCH_VARLEN_GQA else {}
    return torch_varlen_attn(q, k, v, cu, cu, T, T, window_size=(left, 0), **gqa)


def attention(q, k, v, meta: AttnMeta, window=None):
    """q: (B, T, H, hd), k/v: (B, S, KV, hd) -> (B, T, H, hd)."""
    B, T, H, hd = q.shape
    if meta.cu_seqlens is not None:  # packed rows on CUDA: no mask, no padding FLOPs, GQA without repeating K/V
        # max_seqlen = T, an upper bound of every segment: a shape, not a value read back from the GPU, so a
        # compiled block neither syncs nor recompiles as the documents' lengths change
        q, k, v, cu = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), meta.cu_seqlens
        left = window - 1 if window is not None and T > window else -1
        if flash_attn_varlen_func is not None:
            out = flash_attn_varlen_func(q, k, v, cu, cu, T, T, causal=True, window_size=(left, 0))
        else:
            out = _torch_varlen(q, k, v, cu, T, left)
        return out.view(B, T, H, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    gqa = k.shape[1] != H
    if gqa and meta.mask is not None and q.is_cuda:
        # CUDA's fused SDPA kernels take a mask or enable_gqa, not both; together they fall to the math kernel,
        # which materialises B x H x T x S scores. Repeating K/V costs only their size.
        k, v, gqa = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1), False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, is_causal=meta.mask is None,
                                         enable_gqa=gqa)
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

    def forward(self, x, cos, sin, meta, kv=None):  # kv: this layer's KVCache when generating
        B, T, _ = x.shape
        H, KV, hd = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = apply_rotary(q.view(B, T, H, hd), cos, sin)
        k = apply_rotary(k.view(B, T, KV, hd), cos, sin)
        v = v.view(B, T, KV, hd)
        if kv is not None:
            k, v = kv.update(k, v, meta)
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

    def forward(self, x, cos, sin, meta, kv=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, meta, kv)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """One layer's keys and values for generation: (B, S_max, KV, hd) each, allocated at the first write in the
    dtype the layer computes in (bf16 under mixed precision, whatever the parameters are stored in)."""

    def __init__(self, shape):
        self.shape, self.k, self.v = shape, None, None

    def update(self, k, v, meta: AttnMeta):  # writes the new keys/values at their slots; returns slots [0, end)
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        rows = torch.arange(len(meta.slots), device=meta.slots.device)[:, None]
        self.k[rows, meta.slots], self.v[rows, meta.slots] = k, v
        return self.k[:, :meta.end], self.v[:, :meta.end]


class Cache:
    """What generation keeps between forwards: a KVCache per layer and, for every row and slot, the document and
    position of the token held there (document -1: nothing). Each row fills at its own pace (`lengths`), so
    prompts of different lengths need no left padding: a right-padded prompt advances its row by its real tokens
    only, and the next token overwrites the first padding slot. A query sees the earlier slots of its own
    document and of document 0, the shared prefix: the prompt, which label-set scoring continues with many
    candidate answers (documents 1, 2, ..) in one row."""

    def __init__(self, cfg: LMConfig, batch_size, max_len, device):
        self.layers = [KVCache((batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)) for _ in range(cfg.n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # slots filled, per row
        self.document_ids = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.window = cfg.sliding_window

    def advance(self, document_ids, position_ids):
        """Place T new tokens per row after each row's filled slots -> the attention metadata of this forward.
        document_ids (B, T): -1 (padding) only after a row's real tokens; None: all document 0."""
        B, T = position_ids.shape
        slots = self.lengths[:, None] + torch.arange(T, device=position_ids.device)  # (B, T)
        end = int(slots.max()) + 1
        if end > self.document_ids.shape[1]:
            raise ValueError(f"KV cache full: {end} slots needed, {self.document_ids.shape[1]} allocated")
        docs = torch.zeros_like(position_ids) if document_ids is None else document_ids
        rows = torch.arange(B, device=slots.device)[:, None]
        self.document_ids[rows, slots], self.positions[rows, slots] = docs, position_ids
        k_docs, k_positions = self.document_ids[:, None, :end], self.positions[:, None, :end]  # (B, 1, end)
        allowed = (torch.arange(end, device=slots.device) <= slots[..., None]) & (k_docs >= 0) & (
            (k_docs == docs[..., None]) | (k_docs == 0))  # (B, T, end)
        if self.window is not None:
            allowed &= position_ids[..., None] - k_positions < self.window
        self.lengths = self.lengths + (docs >= 0).sum(1)  # a new tensor: callers may hold the old (positions)
        return AttnMeta(mask=allowed[:, None], slots=slots, end=end)

    # Continuous batching (nanovlm/engine.py): new requests are prefilled in a Cache of their own, then moved into rows
    # of the running batch's Cache, which decodes only its rows up to the last busy one.

    def insert(self, row, other, other_row=0):
        """Put row `other_row` of `other` (prefilled prompts) into row `row`, forgetting what that row held."""
        n = int(other.lengths[other_row])
        for mine, theirs in zip(self.layers, other.layers):
            if mine.k is None:
                mine.k, mine.v = theirs.k.new_zeros(mine.shape), theirs.v.new_zeros(mine.shape)
            mine.k[row, :n], mine.v[row, :n] = theirs.k[other_row, :n], theirs.v[other_row, :n]
        self.document_ids[row], self.positions[row] = -1, 0
        self.document_ids[row, :n] = other.document_ids[other_row, :n]
        self.positions[row, :n] = other.positions[other_row, :n]
        self.lengths[row] = n

    def release(self, row):
        """Row `row` holds nothing (its slots are masked out until the next insert)."""
        self.document_ids[row], self.lengths[row] = -1, 0

    def rows(self, n):
        """A Cache over rows [0, n) that shares this one's keys, values and slot tables (once an insert has
        allocated them). A forward gives it lengths of its own (advance makes a new tensor): copy them back with
        `self.lengths[:n] = view.lengths`."""
        view = object.__new__(Cache)
        view.layers = []
        for layer in self.layers:
            part = KVCache((n, *layer.shape[1:]))
            part.k, part.v = (None, None) if layer.k is None else (layer.k[:n], layer.v[:n])
            view.layers.append(part)
        view.lengths, view.document_ids, view.positions = self.lengths[:n], self.document_ids[:n], self.positions[:n]
        view.window = self.window
        return view


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

    def forward(self, x, position_ids=None, document_ids=None, cache: Cache | None = None):
        """x: input embeddings (B, T, D) -> final-norm hidden states (B, T, D).
        position_ids (B, T): per-sample positions (default 0..T-1); document_ids (B, T): which sample of the row
        each token belongs to (padding is -1), None for one sample per row. With a cache, the new tokens follow
        each row's filled slots (see Cache)."""
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
        varlen = cache is None and varlen_kernel(x) is not None
        if varlen and document_ids is None:
            document_ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
        if cache is not None:
            meta = cache.advance(document_ids, position_ids)
        else:
            meta = attention_meta(document_ids, T, self.cfg.sliding_window, varlen)
        cos, sin = self.rotary(position_ids)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, meta, use_reentrant=False)
            else:
                x = layer(x, cos, sin, meta, None if cache is None else cache.layers[i])
        return self.norm(x)
