"""The vision encoder: one ViT `Block` for CLIP and SigLIP checkpoints.

CLIP has a class token and a LayerNorm before the blocks (`pre_layrnorm`); SigLIP has neither, and a LayerNorm
after the last block. Only the blocks up to the selected layer are built: LLaVA reads the features of the
second-to-last block (`select_layer=-2`), so the last block is never computed nor loaded.

The output of `VisionTower(frames)` equals transformers' `hidden_states[select_layer]` (for SigLIP with
`select_layer=-1`, its `last_hidden_state`, which includes `post_layernorm`), class token dropped.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm.lm import ACTIVATIONS


@dataclass
class VisionConfig:
    image_size: int
    patch_size: int
    dim: int
    n_layers: int  # blocks of the checkpoint
    n_heads: int
    hidden_dim: int
    norm_eps: float
    hidden_act: str
    class_token: bool  # CLIP: class token + pre-LayerNorm; SigLIP: neither
    select_layer: int = -2  # index into transformers' hidden_states (0 = embeddings)

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size

    @property
    def layers_used(self):  # blocks that run: hidden_states[k] is the output of block k
        return self.select_layer % (self.n_layers + 1)

    @property
    def post_norm(self):  # SigLIP's last_hidden_state is post-normed; CLIP's post_layernorm is for pooling only
        return not self.class_token and self.layers_used == self.n_layers


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd), bidirectional
        return self.o(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        n_positions = cfg.grid ** 2 + cfg.class_token
        self.patch_embed = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=not cfg.class_token)
        self.pos_embed = nn.Parameter(torch.empty(n_positions, cfg.dim))
        self.class_embed = nn.Parameter(torch.empty(cfg.dim)) if cfg.class_token else None
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.class_token else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers_used))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.post_norm else None
        self.grad_checkpointing = False

    def forward(self, frames):
        """frames: (N, 3, H, W) normalised -> patch features (N, grid*grid, dim), class token dropped."""
        x = self.patch_embed(frames).flatten(2).transpose(1, 2)  # (N, grid*grid, dim)
        if self.class_embed is not None:
            x = torch.cat([self.class_embed.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        if self.post_norm is not None:
            x = self.post_norm(x)
        return x[:, 1:] if self.class_embed is not None else x
