"""The VLM: vision tower -> per-frame pooling -> projector -> visual tokens spliced into the LM's input.

A video is a sequence of frames; an image is a video of one frame, so there is one code path. All frames of a
batch are encoded together as (N, 3, H, W). Each frame's patch grid is average-pooled with `pool_stride` (before
the projector, which then runs on fewer tokens), projected to the LM width, and the frames' tokens are laid out in
time order. The data pipeline has already expanded each `<video>`/`<image>` placeholder into as many
`VISUAL_TOKEN` ids as the media has visual tokens, so splicing is one `masked_scatter` in row-major order.

`forward` returns the summed loss and the number of supervised tokens, so that training can normalise by the
global count across ranks and micro-steps rather than averaging per-row means.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanovlm import hf, llava
from nanovlm.lm import LM, Cache, LMConfig
from nanovlm.media import load_preprocess
from nanovlm.vision import VisionConfig, VisionTower

VISUAL_TOKEN = -200  # input_ids value of a position that receives one visual token (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE = -100  # targets value of a position that is not supervised


@dataclass
class VLMConfig:
    vision: VisionConfig
    lm: LMConfig
    projector: str = "mlp2x_gelu"  # LLaVA's names: "mlp2x_gelu" | "linear"
    pool_stride: int = 1  # average-pool each frame's patch grid by this factor (1 = no pooling)
    pixel_mean: tuple = (0.5, 0.5, 0.5)  # uint8 frames are normalised with the tower's own mean/std
    pixel_std: tuple = (0.5, 0.5, 0.5)

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

    @torch.no_grad()
    def init_weights(self, seed=0):
        """After `to_empty`: RoPE buffers, and the projector's init: PyTorch's Linear default (as LLaVA), drawn on
        the CPU from `seed` whatever the device and sharding, so every rank holds its rows of the same init. The
        towers' weights then come from their checkpoints (`load_weights`)."""
        self.lm.init_weights()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            full = projector(self.cfg.projector, self.cfg.vision.dim, self.cfg.lm.dim)  # nn.Linear inits itself
        for name, p in self.projector.named_parameters():
            value = full.get_parameter(name)
            hf.copy_rows(p, value.shape[0], 0, lambda start, stop, value=value: value[start:stop])

    def encode_frames(self, frames, dtype=torch.float32):
        """frames: (N, 3, H, W), uint8 pixels or already normalised floats -> visual tokens (N, tokens_per_frame,
        lm dim), computed in dtype. uint8 frames cross from the data workers at a quarter of fp32's bytes and are
        normalised here, on the device, with the tower's mean/std."""
        if frames.dtype == torch.uint8:
            frames = normalize(frames, self.cfg)
        features = self.vision(frames.to(dtype))  # (N, grid*grid, vision dim)
        s = self.cfg.pool_stride
        if s > 1:
            N, P, D = features.shape
            g = self.cfg.vision.grid
            grid = features.transpose(1, 2).reshape(N, D, g, g)
            features = F.avg_pool2d(grid, s, ceil_mode=True).flatten(2).transpose(1, 2)  # (N, (g/s)^2, D)
        return self.projector(features)

    def embed(self, input_ids, frames=None, visual=None):
        """input_ids (B, T) with VISUAL_TOKEN where visual tokens go -> input embeddings (B, T, D).
        frames=None: no media in this forward on any rank (decoding steps). A tensor, even an empty one: the tower
        runs, on one blank frame if there is none, whose tokens are added times zero. Every vision block is an
        FSDP unit, so a rank whose batch holds only text (or whose media all failed) must still take part in
        the tower's all-gathers and gradient reductions, or its peers hang. visual: instead of frames, their
        tokens already encoded (N * tokens_per_frame, D), as the serving engine keeps them for media sent again."""
        x = self.lm.embed(input_ids.clamp_min(0))
        if visual is None:
            if frames is None:
                return x
            if frames.shape[0] == 0:
                blank = torch.zeros(1, 3, *frames.shape[2:], dtype=frames.dtype, device=frames.device)
                return x + 0 * self.encode_frames(blank, x.dtype).sum()
            visual = self.encode_frames(frames, x.dtype).flatten(0, 1)  # (N * tokens_per_frame, D)
        slots = input_ids == VISUAL_TOKEN
        torch._assert_async(slots.sum() == visual.shape[0], "visual token count differs from the frames given")
        return x.masked_scatter(slots[..., None], visual.to(x.dtype))

    def forward(self, input_ids, frames=None, targets=None, position_ids=None, document_ids=None, cache=None,
                per_token=False, visual=None):
        """Without targets: logits (B, T, vocab); with a KV cache, (B, vocab) of each row's last real new token.
        With targets (B, T), already shifted (targets[t] is the token to predict at t, IGNORE where unsupervised):
        (summed cross-entropy, number of supervised tokens), or with per_token the (B, T) losses (0 where
        unsupervised)."""
        h = self.lm(self.embed(input_ids, frames, visual), position_ids, document_ids, cache)
        if targets is None:
            if cache is None:
                return self.lm.logits(h)
            last = h.shape[1] - 1 if document_ids is None else (document_ids >= 0).sum(1) - 1
            return self.lm.logits(h[torch.arange(len(h)), last])
        supervised = targets != IGNORE
        logits = self.lm.logits(h[supervised]).float()  # only where there is a target: visual tokens dominate T
        if not per_token:
            return F.cross_entropy(logits, targets[supervised], reduction="sum"), supervised.sum()
        losses = torch.zeros(targets.shape, device=h.device)
        losses[supervised] = F.cross_entropy(logits, targets[supervised], reduction="none")
        return losses

    @torch.no_grad()
    def score(self, prompts, frames, candidates, chunk_tokens=256):
        """Log-likelihood of every candidate answer after every prompt: (B, K), the sum of log p over the answer's
        tokens (end-of-answer included, so an answer that is a prefix of another does not win by being short).
        prompts: list of B 1-D id tensors (VISUAL_TOKEN slots included), frames: their frames in order;
        candidates: list of K non-empty 1-D id tensors, the same for every prompt (a label set).
        The prompts (videos included) run once; then candidates, as many as fit in chunk_tokens, continue each
        prompt's KV cache side by side in one row, each its own document that sees the prompt and itself. The
        cache is never copied: memory is the prompts' cache plus one chunk, whatever the number of candidates.
        Through forward(), like generate(), so a sharded model can score too: every rank calls it with the same
        candidates, and a rank with no prompt scores a dummy one."""
        device = self.lm.embed.weight.device
        B = len(prompts)
        prompts = prompts or [torch.zeros(1, dtype=torch.long)]
        chunks, chunk = [[]], max([chunk_tokens] + [len(c) - 1 for c in candidates])
        for k, c in enumerate(candidates):  # greedy split into chunks of whole candidates
            if sum(len(candidates[j]) - 1 for j in chunks[-1]) + len(c) - 1 > chunk:
                chunks.append([])
            chunks[-1].append(k)
        input_ids, position_ids, document_ids = right_padded(prompts, device)
        cache = Cache(self.cfg.lm, len(prompts), input_ids.shape[1] + chunk, device)
        first = self(input_ids, frames, None, position_ids, document_ids, cache).float().log_softmax(-1)
        scores = first[:, torch.stack([c[0] for c in candidates]).to(device)]  # (len(prompts), K): first tokens
        filled = cache.lengths.clone()
        for group in chunks:  # the rest of each answer: its tokens but the last are inputs
            pieces = [(j, candidates[k]) for j, k in enumerate(group) if len(candidates[k]) > 1]
            if not pieces:
                continue
            ids = torch.cat([c[:-1] for _, c in pieces]).to(device)
            targets = torch.cat([c[1:] for _, c in pieces]).to(device)
            which = torch.cat([torch.full((len(c) - 1,), j) for j, c in pieces]).to(device)  # chunk index
            offsets = torch.cat([torch.arange(len(c) - 1) for _, c in pieces]).to(device)
            cache.lengths = filled.clone()  # every chunk continues the prompts, over the previous chunk
            n = len(ids)
            losses = self(ids.expand(len(prompts), n), None, targets.expand(len(prompts), n),
                          filled[:, None] + offsets, (which + 1).expand(len(prompts), n), cache, per_token=True)
            scores[:, group] -= losses.new_zeros(len(prompts), len(group)).index_add_(1, which, losses)
        return scores[:B]

    @torch.no_grad()
    def generate(self, prompts, frames=None, max_new_tokens=32, temperature=0.0, top_p=1.0, eos_id=None,
                 generator=None, distributed=False, stream=None):
        """prompts: list of 1-D id tensors (VISUAL_TOKEN slots included), frames: all their frames in order.
        Rows are right-padded and fill one KV cache at their own pace, so prompts of any length decode together.
        Greedy when temperature == 0, else temperature + nucleus (top_p) sampling. Returns one id list per prompt,
        ending before eos_id. `distributed`: every rank of a sharded model calls this together; they stop together,
        since each forward gathers parameters from all of them, and a rank with no prompt decodes a dummy one.
        `stream`: called with each step's tokens (B,)."""
        device = self.lm.embed.weight.device
        B = len(prompts)
        prompts = prompts or [torch.zeros(1, dtype=torch.long)]
        input_ids, position_ids, document_ids = right_padded(prompts, device)
        cache = Cache(self.cfg.lm, len(input_ids), input_ids.shape[1] + max_new_tokens, device)
        long_from = self.cfg.lm.rope_scaling.get("original_max_position_embeddings") \
            if self.cfg.lm.rope_type == "longrope" else None  # see below
        out = torch.empty(len(input_ids), 0, dtype=torch.long, device=device)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=device) | (B == 0)
        logits = self(input_ids, frames, None, position_ids, document_ids, cache)  # (B, vocab): each row's last
        for step in range(max_new_tokens):
            token = sample(logits.float(), temperature, top_p, generator)  # (B,)
            if stream is not None and B:
                stream(token)
            out = torch.cat([out, token[:, None]], dim=1)
            if eos_id is not None:
                done |= token == eos_id
            finished = done.all().float()
            if distributed:
                dist.all_reduce(finished, op=dist.ReduceOp.MIN)
            if finished.item() or step == max_new_tokens - 1:
                break
            if long_from is not None and collective_any(int(cache.lengths.max()) == long_from, distributed, device):
                # Phi-3's longrope switches to its long factors once a position reaches the original context;
                # transformers then drops the cache and encodes the whole sequence again with them: so do we
                # (all ranks together, as every forward is collective; re-encoding a row early changes nothing)
                prompts = [torch.cat([p.to(device), row]) for p, row in zip(prompts, out)]
                input_ids, position_ids, document_ids = right_padded(prompts, device)
                cache = Cache(self.cfg.lm, len(input_ids), input_ids.shape[1] + max_new_tokens - step - 1, device)
                logits = self(input_ids, frames, None, position_ids, document_ids, cache)
                continue
            # through forward(), so a sharded (FSDP) model gathers its parameters as in training
            logits = self(token[:, None], None, None, cache.lengths[:, None], None, cache)
        answers = []
        for row in out[:B].tolist():
            answers.append(row[:row.index(eos_id)] if eos_id in row else row)
        return answers


def normalize(frames, cfg: VLMConfig):
    """uint8 (N, 3, H, W) pixels -> float (x/255 - mean)/std with the tower's mean/std, in two in-place ops."""
    mean = torch.tensor(cfg.pixel_mean, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=frames.device).view(1, 3, 1, 1)
    return frames.float().mul_(1 / (255 * std)).sub_(mean / std)


def collective_any(flag, distributed, device):
    """Whether flag holds on any rank (on this one alone when not distributed)."""
    flag = torch.tensor(float(flag), device=device)
    if distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def right_padded(prompts, device):
    """1-D id tensors -> input_ids, position_ids, document_ids (B, T): rows right-padded to the longest, padding
    in document -1, positions 0, 1, .. from each row's first token."""
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.zeros(B, T, dtype=torch.long, device=device)
    document_ids = torch.full((B, T), -1, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        input_ids[row, :len(p)], document_ids[row, :len(p)] = p.to(device), 0
    return input_ids, torch.arange(T, device=device).expand(B, T), document_ids


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
# Building: on the meta device, then materialised (plain or FSDP-sharded) and filled by load_weights

def vlm_config(vision_path, lm_path, projector="mlp2x_gelu", pool_stride=1, select_layer=-2) -> VLMConfig:
    """From the towers' config.json files (and the vision tower's preprocessor_config.json for mean/std). Either
    path may also be a LLaVA checkpoint (nanovlm/llava.py): a llava-hf directory holds both towers, an original
    LLaVA checkpoint the LM."""
    vision = hf.vision_config(llava.vision_dict(vision_path), select_layer, vision_path)
    lm = hf.lm_config(llava.text_dict(lm_path), lm_path)
    pre = load_preprocess(vision_path)
    return VLMConfig(vision=vision, lm=lm, projector=projector, pool_stride=pool_stride, pixel_mean=pre.mean,
                     pixel_std=pre.std)


def load_weights(model: VLM, vision_path, lm_path, seed=0, trained=None):
    """Fill a materialised model, plain or FSDP-sharded (then each rank reads only the rows it holds, so no
    process holds the whole model): RoPE buffers and the projector's seeded init (init_weights), the towers from
    their checkpoints, then what a stage starts from over them (`trained`: a run's trained.safetensors, or a
    LLaVA checkpoint whose projector is taken)."""
    model.init_weights(seed)
    sources = {"vision": (vision_path, llava.read_llava(vision_path)), "lm": (lm_path, llava.read_llava(lm_path))}
    if sources["lm"][1] is not None and {"vision", "lm"} <= sources["lm"][1]["holds"]:
        sources["vision"] = sources["lm"]  # an original LLaVA finetuned with its tower holds its own copy of it
    for part, (path, info) in sources.items():
        if info is None:
            (hf.load_vision if part == "vision" else hf.load_lm)(getattr(model, part), path)
        else:  # a LLaVA checkpoint as a tower: its own tower or LM, under its names
            llava.load_llava(model, path, info, {part})
    if trained is None:
        return
    info = llava.read_llava(trained)
    if info is None:
        load_trained(model, trained)
    else:  # a published LLaVA checkpoint to start from: the projector (its towers are the run's tower paths)
        llava.load_llava(model, trained, info, {"projector"})


def from_pretrained(vision_path, lm_path, device="cpu", seed=0, **kwargs):
    """One process's whole model from Hugging Face towers (the projector initialised from seed)."""
    with torch.device("meta"):
        model = VLM(vlm_config(vision_path, lm_path, **kwargs))
    model.to_empty(device=device)
    load_weights(model, vision_path, lm_path, seed)
    return model


def load_trained(model: VLM, path):
    """Overlay a run's trained.safetensors (the weights it trained) on a model whose towers are loaded: every key
    must be a parameter of the same shape; the rest stays as the towers gave it. Sharded like load_weights."""
    trained, params = hf.CheckpointFiles(path), dict(model.named_parameters())
    unknown = sorted(set(trained.files) - set(params))
    if unknown:
        raise ValueError(f"{path} has {len(unknown)} keys this model lacks, e.g. {unknown[:3]}: it was trained "
                         f"with other towers or settings")
    for key in trained.files:
        shape = trained.shape_and_float(key)[0]
        if shape != tuple(params[key].shape):
            raise ValueError(f"{path}: {key} has shape {shape}, the model's is {tuple(params[key].shape)}: it was "
                             f"trained with other towers or settings")
        hf.copy_rows(params[key], shape[0], 0, lambda start, stop, key=key: trained.read(key, start, stop))
