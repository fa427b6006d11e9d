"""Hugging Face checkpoints in, strictly: config.json -> our dataclass configs, tensors -> our parameters.

Each supported layout has an explicit key table, `{}` standing for the layer index (as in torchtitan). Loading
copies every checkpoint tensor straight into its slot of an already materialised module, so a model never exists
twice in memory, and it checks, before copying anything, that

  - every parameter of the module is covered exactly once (fused q/k/v and gate/up rows tile the parameter),
  - every tensor named by the table is in the checkpoint with the right shape and a floating dtype,
  - every other tensor in the checkpoint matches a pattern we deliberately ignore (a CLIP text tower, the SigLIP
    pooling head, blocks after the selected vision layer, ...).

Anything else is an error naming the key. Checkpoints are `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or the same two layouts as PyTorch `.bin` files (Vicuna v1.5 ships those).
Parameters may be FSDP-sharded: each rank then reads only its rows of each tensor, straight from the file into
its shard, so no process ever holds the whole model (a 13B model in fp32 is 53 GB).
"""

import json
import os
import re

import torch
from torch.distributed.tensor import DTensor, Shard

from nanovlm.lm import LMConfig
from nanovlm.vision import VisionConfig

SUPPORTED_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")
SUPPORTED_VISION = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")


def read_config(path):
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path}: expected a Hugging Face model directory")
    with open(file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# config.json -> configs

def lm_config(hf: dict, path: str = "") -> LMConfig:
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED_LMS:
        raise ValueError(f"{path}: architecture {arch} is not supported; nanovlm loads {', '.join(SUPPORTED_LMS)}")
    if hf.get("mlp_bias") or (arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window")):
        raise ValueError(f"{path}: mlp_bias / Qwen2 per-layer sliding windows are not supported")
    # transformers 5 writes `rope_parameters`; older files have `rope_theta` and `rope_scaling` at the top level
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), "partial_rotary_factor": hf.get("partial_rotary_factor", 1.0),
            "original_max_position_embeddings": hf.get("original_max_position_embeddings")}
    rope.update(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3", "longrope"):
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported (default, linear, llama3, longrope)")
    n_heads = hf["num_attention_heads"]
    return LMConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=rope["rope_theta"], rope_type=rope_type, rope_scaling=rope,
        partial_rotary_factor=rope["partial_rotary_factor"] or 1.0,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        sliding_window=hf.get("sliding_window") if arch != "Qwen2ForCausalLM" else None,
        hidden_act=hf.get("hidden_act", "silu"))


def vision_config(hf: dict, select_layer: int = -2, path: str = "") -> VisionConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_VISION:
        raise ValueError(f"{path}: vision model_type {model_type!r} is not supported; nanovlm loads CLIP and SigLIP "
                         f"({', '.join(SUPPORTED_VISION)})")
    clip = model_type.startswith("clip")
    v = hf.get("vision_config", hf)  # a full CLIPModel / SiglipModel nests the vision tower's config
    cfg = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32 if clip else 16),
        dim=v.get("hidden_size", 768), n_layers=v.get("num_hidden_layers", 12),
        n_heads=v.get("num_attention_heads", 12), hidden_dim=v.get("intermediate_size", 3072),
        norm_eps=v.get("layer_norm_eps", 1e-5 if clip else 1e-6),
        hidden_act=v.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh"),
        class_token=clip, select_layer=select_layer)
    if not -cfg.n_layers - 1 <= select_layer <= cfg.n_layers or cfg.layers_used == 0:
        raise ValueError(f"{path}: vision_select_layer={select_layer} is outside the tower's {cfg.n_layers} blocks")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Key tables: (checkpoint key, our key, first row of our parameter the tensor fills)

def lm_key_table(cfg: LMConfig, arch: str):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    table = [("model.embed_tokens.weight", "embed.weight", 0), ("model.norm.weight", "norm.weight", 0)]
    if not cfg.tie_embeddings:
        table.append(("lm_head.weight", "head.weight", 0))
    L, A = "model.layers.{}.", "layers.{}."
    per_layer = [(L + "input_layernorm.weight", A + "attn_norm.weight", 0),
                 (L + "post_attention_layernorm.weight", A + "mlp_norm.weight", 0),
                 (L + "self_attn.o_proj.weight", A + "attn.o.weight", 0),
                 (L + "mlp.down_proj.weight", A + "mlp.down.weight", 0)]
    if arch == "Phi3ForCausalLM":  # already fused, in our order
        per_layer += [(L + "self_attn.qkv_proj.weight", A + "attn.qkv.weight", 0),
                      (L + "mlp.gate_up_proj.weight", A + "mlp.gate_up.weight", 0)]
    else:
        for suffix in ["weight", "bias"] if cfg.qkv_bias else ["weight"]:
            per_layer += [(L + f"self_attn.{p}_proj.{suffix}", A + f"attn.qkv.{suffix}", row)
                          for p, row in (("q", 0), ("k", q), ("v", q + kv))]
        per_layer += [(L + "mlp.gate_proj.weight", A + "mlp.gate_up.weight", 0),
                      (L + "mlp.up_proj.weight", A + "mlp.gate_up.weight", cfg.hidden_dim)]
    if cfg.o_bias:
        per_layer.append((L + "self_attn.o_proj.bias", A + "attn.o.bias", 0))
    return table + [(h.format(i), o.format(i), r) for i in range(cfg.n_layers) for h, o, r in per_layer]


# tensors a causal-LM checkpoint may hold that we deliberately do not use
LM_IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"]


def vision_key_table(cfg: VisionConfig):
    table = [("embeddings.patch_embedding.weight", "patch_embed.weight", 0),
             ("embeddings.position_embedding.weight", "pos_embed", 0)]
    if cfg.class_token:
        table += [("embeddings.class_embedding", "class_embed", 0),
                  ("pre_layrnorm.weight", "pre_norm.weight", 0), ("pre_layrnorm.bias", "pre_norm.bias", 0)]
    else:
        table.append(("embeddings.patch_embedding.bias", "patch_embed.bias", 0))
    if cfg.post_norm:
        table += [("post_layernorm.weight", "post_norm.weight", 0), ("post_layernorm.bias", "post_norm.bias", 0)]
    L, A = "encoder.layers.{}.", "layers.{}."
    per_layer = []
    for s in ("weight", "bias"):
        per_layer += [(L + f"self_attn.{p}_proj.{s}", A + f"attn.qkv.{s}", row * cfg.dim)
                      for row, p in enumerate("qkv")]
        per_layer += [(L + f"self_attn.out_proj.{s}", A + f"attn.o.{s}", 0),
                      (L + f"layer_norm1.{s}", A + f"norm1.{s}", 0), (L + f"layer_norm2.{s}", A + f"norm2.{s}", 0),
                      (L + f"mlp.fc1.{s}", A + f"fc1.{s}", 0), (L + f"mlp.fc2.{s}", A + f"fc2.{s}", 0)]
    return table + [(h.format(i), o.format(i), r) for i in range(cfg.layers_used) for h, o, r in per_layer]


def vision_ignored(cfg: VisionConfig):
    """The text tower and contrastive heads of a full CLIPModel/SiglipModel, SigLIP's pooling head, the
    post-LayerNorm when unused, and the blocks after the selected layer."""
    unused_blocks = [rf"encoder\.layers\.{i}\..*" for i in range(cfg.layers_used, cfg.n_layers)]
    return [r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_(scale|bias)", r"head\..*",
            r"post_layernorm\..*", r"embeddings\.position_ids"] + unused_blocks


# ----------------------------------------------------------------------------------------------------------------
# Strict loading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class CheckpointFiles:
    """Maps every tensor name of a checkpoint directory (or one .safetensors file) to the file that holds it, and
    reads any range of a tensor's rows without reading the rest. safetensors are read with plain file reads
    into the destination's shape (its header gives each tensor's byte range), not memory-mapped: a rank loading
    its shard of a 13B model then holds that shard, not the file pages it touched. .bin files are pickles and
    are memory-mapped (torch.load(mmap=True))."""

    def __init__(self, path):
        self.path, self._bins, self._headers = path, {}, {}
        if os.path.isfile(path):
            self.files = {k: path for k in self._header(path)[0]}
            return
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(index := os.path.join(path, index_name)):
                with open(index) as f:
                    self.files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
                return
        single = [f for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(f := os.path.join(path, n))]
        if not single:
            raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or an index of them in {path}")
        file = single[0]
        self.files = {k: file for k in (self._header(file)[0] if file.endswith(".safetensors") else self._bin(file))}

    def _header(self, file):  # safetensors: 8 bytes of header length, a JSON header, then the data
        if file not in self._headers:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self._headers[file] = header, 8 + n
        return self._headers[file]

    def _bin(self, file):
        if file not in self._bins:
            self._bins[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._bins[file]

    def shape_and_float(self, key):  # without reading the data
        file = self.files[key]
        if not file.endswith(".safetensors"):
            t = self._bin(file)[key]
            return tuple(t.shape), t.is_floating_point()
        info = self._header(file)[0][key]
        return tuple(info["shape"]), info["dtype"] in ("F64", "F32", "F16", "BF16")

    def read(self, key, start, stop):
        """Rows [start, stop) of a tensor of one or more dimensions, in its stored dtype."""
        file = self.files[key]
        if not file.endswith(".safetensors"):
            t = self._bin(file)[key]
            return t[start:stop] if t.ndim else t.reshape(1)
        header, data_start = self._header(file)
        info = header[key]
        out = torch.empty(stop - start, *info["shape"][1:], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        row_bytes = out.nbytes // max(1, stop - start)
        with open(file, "rb") as f:
            f.seek(data_start + info["data_offsets"][0] + start * row_bytes)
            f.readinto(out.view(-1).view(torch.uint8).numpy())
        return out

    def get(self, key):  # the whole tensor (a 0-d one read as one row)
        shape = self.shape_and_float(key)[0]
        return self.read(key, 0, shape[0]) if shape else self.read(key, 0, 1).reshape(())


def local_rows(param):
    """(the rows of a parameter this rank holds, the global index of the first). FSDP2 shards dim 0 in
    torch.chunk's pieces over a 1-D mesh; a plain tensor is all of it."""
    if not isinstance(param, DTensor):
        return param, 0
    assert param.placements == (Shard(0),), f"expected FSDP's Shard(0), got {param.placements}"
    chunk = -(-param.shape[0] // param.device_mesh.size())
    return param.to_local(), param.device_mesh.get_local_rank() * chunk


@torch.no_grad()
def copy_rows(param, rows, first_row, read):
    """Fill rows [first_row, first_row + rows) of `param` (maybe sharded) with what read(start, stop) returns for
    the part of that range this rank holds, relative to first_row (converted to the parameter's dtype)."""
    local, offset = local_rows(param)
    lo, hi = max(first_row, offset), min(first_row + rows, offset + local.shape[0])
    if lo < hi:
        local[lo - offset:hi - offset].copy_(read(lo - first_row, hi - first_row))


@torch.no_grad()
def load_into(module: torch.nn.Module, path: str, table, ignored, prefixes=("",)):
    """Copy the checkpoint at `path` into `module` through `table`; see the module docstring for the checks.
    `prefixes`: the tower's keys may carry one of these (e.g. "vision_model." in a full CLIPModel); `ignored`
    patterns match a key with that prefix removed, or the whole key where it has none (e.g. "text_model\\..*")."""
    ckpt = CheckpointFiles(path)
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in ckpt.files)), None)
    if prefix is None:
        raise KeyError(f"{path}: no tensor starts with any of {prefixes}")
    params = {n: p for n, p in module.named_parameters() if "lora_" not in n}  # LoRA adapters: initialised, not loaded
    # 1. the checkpoint has every tensor the table names, with a float dtype and a shape that fits its rows
    rows = {name: [] for name in params}
    for hf_key, our_key, row in table:
        if prefix + hf_key not in ckpt.files:
            raise KeyError(f"{path}: missing tensor {prefix + hf_key} (needed for {our_key})")
        shape, is_float = ckpt.shape_and_float(prefix + hf_key)
        p = params[our_key]
        if not is_float or shape[1:] != p.shape[1:] or row + shape[0] > p.shape[0]:
            raise ValueError(f"{path}: tensor {prefix + hf_key} of shape {shape} (float: {is_float}) does not fit "
                             f"rows {row}.. of {our_key} {tuple(p.shape)}")
        rows[our_key].append((row, shape[0], f"{prefix + hf_key} {shape}"))
    # 2. every parameter is tiled exactly once by those rows
    for name, parts in rows.items():
        covered = 0
        for row, n, _ in sorted(parts):
            if row != covered:
                break
            covered += n
        if covered != params[name].shape[0]:
            sources = ", ".join(key for _, _, key in parts) or "no tensor"
            raise ValueError(f"{path}: {name} {tuple(params[name].shape)} is not tiled exactly by {sources}")
    # 3. every other checkpoint tensor is deliberately ignored
    used = {prefix + h for h, _, _ in table}
    ignore = re.compile("|".join(f"(?:{p})" for p in ignored))
    for key in ckpt.files:
        if key not in used and not ignore.fullmatch(key.removeprefix(prefix)):
            raise KeyError(f"{path}: unexpected tensor {key} in {os.path.basename(ckpt.files[key])}; "
                           f"it matches no parameter of this model")
    for hf_key, our_key, row in table:  # each rank reads only the rows it holds
        key = prefix + hf_key
        copy_rows(params[our_key], ckpt.shape_and_float(key)[0][0], row,
                  lambda start, stop: ckpt.read(key, start, stop))


def load_lm(lm, path):
    hf = read_config(path)
    table = lm_key_table(lm.cfg, hf["architectures"][0])
    load_into(lm, path, table, LM_IGNORED)


def load_vision(tower, path):
    load_into(tower, path, vision_key_table(tower.cfg), vision_ignored(tower.cfg), prefixes=("vision_model.", ""))
