"""The VLM: vision tower -> per-frame pooling -> projector -> visual tokens spliced into the LM's input.

A video is a sequence of frames; an image is a video of one frame, so there is one code path. All frames of a
batch are encoded together as (N, 3, H, W). Each frame's patch grid is average-pooled with `pool_stride` (before
the projector, which then runs on fewer tokens), projected to the LM width, and the frames' tokens are laid out in
time order. The data pipeline has already expanded each `<video>`/`<image>` placeholder into as many
`VISUAL_TOKEN` ids as the media has visual tokens, so splicing is one `masked_scatter` in row-major order.

`forward` returns the summed loss and the number of supervised tokens, so that training can normalise by the
global count across ranks and micro-steps rather than averaging per-row means.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanovlm import hf
from nanovlm.lm import LM, KVCache, LMConfig
from nanovlm.vision import VisionConfig, VisionTower

VISUAL_TOKEN = -200  # input_ids value of a position that receives one visual token (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100  # targets value of a position that is not supervised


@dataclass
class VLMConfig:
    vision: VisionConfig
    lm: LMConfig
    projector: str = "mlp2x_gelu"  # LLaVA's names: "mlp2x_gelu" | "linear"
    pool_stride: int = 1  # average-pool each frame's patch grid by this factor (1 = no pooling)

    @property
    def tokens_per_frame(self):
        return math.ceil(self.vision.grid / self.pool_stride) ** 2


def projector(kind, vision_dim, lm_dim):
    # nn.Sequential so the keys are LLaVA's mm_projector keys: 0.weight, 2.weight
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim))
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    raise ValueError(f"unknown projector {kind!r}: use 'mlp2x_gelu' or 'linear'")


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = projector(cfg.projector, cfg.vision.dim, cfg.lm.dim)
        self.lm = LM(cfg.lm)

    def init_weights(self):
        """After `to_empty`: RoPE buffers, and the projector's init (PyTorch's Linear default, as LLaVA). The
        towers' weights are then loaded from their checkpoints (`from_pretrained`) or a training checkpoint."""
        self.lm.init_weights()
        for m in self.projector:
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def encode_frames(self, frames):
        """frames: (N, 3, H, W) -> visual tokens (N, tokens_per_frame, lm dim)."""
        features = self.vision(frames)  # (N, grid*grid, vision dim)
        s = self.cfg.pool_stride
        if s > 1:
            N, P, D = features.shape
            g = self.cfg.vision.grid
            grid = features.transpose(1, 2).reshape(N, D, g, g)
            features = F.avg_pool2d(grid, s, ceil_mode=True).flatten(2).transpose(1, 2)  # (N, (g/s)^2, D)
        return self.projector(features)

    def embed(self, input_ids, frames=None):
        """input_ids (B, T) with VISUAL_TOKEN where visual tokens go -> input embeddings (B, T, D)."""
        x = self.lm.embed(input_ids.clamp_min(0))
        if frames is not None and frames.shape[0] > 0:
            visual = self.encode_frames(frames.to(x.dtype)).flatten(0, 1)  # (N * tokens_per_frame, D)
            slots = input_ids == VISUAL_TOKEN
            torch._assert_async(slots.sum() == visual.shape[0], "visual token count differs from the frames given")
            x = x.masked_scatter(slots[..., None], visual.to(x.dtype))
        return x

    def forward(self, input_ids, frames=None, targets=None, position_ids=None, document_ids=None, cache=None,
                per_row=False):
        """Without targets: logits (B, T, vocab), or (B, 1, vocab) of the last position when decoding with a
        KV cache. With targets (B, T), already shifted (targets[t] is the token to predict at t, IGNORE where
        unsupervised): (summed cross-entropy, number of supervised tokens), each of shape (B,) if per_row."""
        h = self.lm(self.embed(input_ids, frames), position_ids, document_ids, cache)
        if targets is None:
            return self.lm.logits(h if cache is None else h[:, -1:])
        supervised = targets != IGNORE
        logits = self.lm.logits(h[supervised]).float()  # only where there is a target: visual tokens dominate T
        if not per_row:
            return F.cross_entropy(logits, targets[supervised], reduction="sum"), supervised.sum()
        losses = F.cross_entropy(logits, targets[supervised], reduction="none")
        rows = supervised.nonzero()[:, 0]
        return losses.new_zeros(len(targets)).index_add_(0, rows, losses), supervised.sum(1)

    @torch.no_grad()
    def score(self, prompts, frames, candidates, chunk=64):
        """Log-likelihood of every candidate answer after every prompt: (B, K), the sum of log p over the answer's
        tokens (end-of-answer included, so an answer that is a prefix of another does not win by being short).
        prompts: list of B 1-D id tensors (VISUAL_TOKEN slots included), frames: their frames in order;
        candidates: list of K non-empty 1-D id tensors, the same for every prompt (a label set). The prompts
        (videos included) run once, left-padded as in generate(); their KV cache is copied for each chunk of
        candidates. Through forward(), like generate(), so a sharded model can score too: every rank calls it
        with the same candidates."""
        device = self.lm.embed.weight.device
        B, K, T = len(prompts), len(candidates), max(len(p) for p in prompts)
        L = max(len(c) for c in candidates) - 1  # the answer's tokens but the last are inputs
        input_ids, position_ids, document_ids = left_padded(prompts, device)
        cache = KVCache(self.cfg.lm, B, T, device)
        first = self(input_ids, frames, None, position_ids, document_ids, cache)[:, -1].float().log_softmax(-1)
        scores = first[:, torch.stack([c[0] for c in candidates]).to(device)]  # (B, K): each answer's first token
        for start in range(0, K if L else 0, chunk):  # the rest of each answer, continuing the prompt's cache
            group = candidates[start:start + chunk]
            n = len(group)
            ids = torch.zeros(n, L, dtype=torch.long, device=device)
            targets = torch.full((n, L), IGNORE, dtype=torch.long, device=device)
            for j, c in enumerate(group):
                ids[j, :len(c) - 1], targets[j, :len(c) - 1] = c[:-1].to(device), c[1:].to(device)
            ids, targets = ids.repeat(B, 1), targets.repeat(B, 1)  # row b * n + j: prompt b, candidate j
            positions = (position_ids[:, -1:] + 1).repeat_interleave(n, 0) + torch.arange(L, device=device)
            loss, _ = self(ids, None, targets, positions, torch.zeros_like(ids), cache.repeat(n, T + L), per_row=True)
            scores[:, start:start + n] -= loss.view(B, n)
        return scores

    @torch.no_grad()
    def generate(self, prompts, frames=None, max_new_tokens=32, temperature=0.0, top_p=1.0, eos_id=None,
                 generator=None, distributed=False, stream=None):
        """prompts: list of 1-D id tensors (VISUAL_TOKEN slots included), frames: all their frames in order.
        Rows are left-padded, each into its own document, so rows of any length decode together with one KV cache.
        Greedy when temperature == 0, else temperature + nucleus (top_p) sampling. Returns one id list per prompt,
        ending before eos_id. `distributed`: every rank of a sharded model calls this together; they stop together,
        since each forward gathers parameters from all of them. `stream`: called with each step's tokens (B,)."""
        device = self.lm.embed.weight.device
        B, T = len(prompts), max(len(p) for p in prompts)
        input_ids, position_ids, document_ids = left_padded(prompts, device)
        padded = bool((document_ids < 0).any())
        cache = KVCache(self.cfg.lm, B, T + max_new_tokens, device)
        out = torch.empty(B, 0, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            # through forward(), so a sharded (FSDP) model gathers its parameters as in training
            logits = self(input_ids, frames, None, position_ids, document_ids if padded else None, cache)[:, -1].float()
            token = sample(logits, temperature, top_p, generator)  # (B,)
            if stream is not None:
                stream(token)
            out = torch.cat([out, token[:, None]], dim=1)
            if eos_id is not None:
                done |= token == eos_id
                finished = done.all().float()
                if distributed:
                    dist.all_reduce(finished, op=dist.ReduceOp.MIN)
                if finished.item():
                    break
            input_ids, frames = token[:, None], None
            position_ids = position_ids[:, -1:] + 1
            document_ids = document_ids.new_zeros(B, 1)
        answers = []
        for row in out.tolist():
            answers.append(row[:row.index(eos_id)] if eos_id in row else row)
        return answers


def left_padded(prompts, device):
    """1-D id tensors -> input_ids, position_ids, document_ids (B, T): rows left-padded to the longest, padding in
    document -1 (attended by nothing else), positions 0, 1, .. from each row's first token."""
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    document_ids = torch.full((B, T), -1, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        input_ids[row, T - len(p):], document_ids[row, T - len(p):] = p.to(device), 0
    return input_ids, ((document_ids >= 0).cumsum(1) - 1).clamp_min(0), document_ids


def sample(logits, temperature, top_p, generator=None):
    """logits (B, vocab) -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Building: from Hugging Face towers, or from a nanovlm checkpoint directory

def vlm_config(vision_path, lm_path, projector="mlp2x_gelu", pool_stride=1, select_layer=-2) -> VLMConfig:
    return VLMConfig(vision=hf.vision_config(hf.read_config(vision_path), select_layer, vision_path),
                     lm=hf.lm_config(hf.read_config(lm_path), lm_path), projector=projector, pool_stride=pool_stride)


def build(cfg: VLMConfig, device="cpu"):
    """The model with allocated but unloaded weights (projector initialised). Built on the meta device first, so
    no time or memory goes into random init of weights that a checkpoint overwrites."""
    with torch.device("meta"):
        model = VLM(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model


def from_pretrained(vision_path, lm_path, device="cpu", **kwargs):
    model = build(vlm_config(vision_path, lm_path, **kwargs), device)
    hf.load_vision(model.vision, vision_path)
    hf.load_lm(model.lm, lm_path)
    return model


def load_trained(model: VLM, path):
    """Overlay a run's trained.safetensors (the weights it trained) on a model whose towers are loaded: every key
    must be a parameter of the same shape; the rest stays as the towers gave it."""
    trained, params = load_file(path), model.state_dict()
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"{path} has {len(unknown)} keys this model lacks, e.g. {unknown[:3]}: it was trained "
                         f"with other towers or settings")
    for key, tensor in trained.items():
        if tensor.shape != params[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(params[key].shape)}: it was trained with other towers or settings")
    model.load_state_dict(trained, strict=False)


def save(model: VLM, path, state_dict=None):
    """A nanovlm checkpoint directory: nanovlm.json (the configs) and model.safetensors (our keys)."""
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg
    with open(os.path.join(path, "nanovlm.json"), "w") as f:
        json.dump({"vision": asdict(cfg.vision), "lm": asdict(cfg.lm), "projector": cfg.projector,
                   "pool_stride": cfg.pool_stride}, f, indent=1)
    state_dict = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "model.safetensors"))


def load(path, device="cpu"):
    """A model saved by `save`, strictly: every parameter must be in the file and nothing else."""
    with open(os.path.join(path, "nanovlm.json")) as f:
        c = json.load(f)
    cfg = VLMConfig(vision=VisionConfig(**c["vision"]), lm=LMConfig(**c["lm"]), projector=c["projector"],
                    pool_stride=c["pool_stride"])
    model = build(cfg, device)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(device)), strict=True)
    return model
