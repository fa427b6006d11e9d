"""Start from published LLaVA weights: what a checkpoint is (`read_llava`), whether it agrees with the run
(`check_settings`), and loading it strictly (`load_llava`). Three layouts, told apart by their files:

  (a) "hf", a llava-hf directory (`LlavaForConditionalGeneration`, `LlavaNextVideoForConditionalGeneration`): tower,
      projector and LM, under the published names (`vision_tower.vision_model.`, `language_model.model.`: vLLM's),
      transformers 4.52's (`model.vision_tower.`, `model.language_model.`, `lm_head.`) or 5's (`vision_tower.`).
      Its configs are read through transformers' classes: published config.json files omit every default value.
  (b) "original", a LLaVA repo checkpoint (`LlavaLlamaForCausalLM`, ...): the LM, `model.mm_projector.*`, `mm_*`
      settings, and the tower named by `mm_vision_tower`, from the checkpoint where it holds a copy.
  (c) "projector", a stage-1 `mm_projector.bin` (its directory's config.json, if any, gives the settings).

Each goes through hf.py's key tables, renamed, and `hf.load_into`: every parameter from exactly one tensor, every
other tensor used or deliberately ignored (`image_newline`, the parts not asked for). What nanovlm cannot run the
same way (a class token kept, SigLIP's last layer without its post-norm, pooling after the projector) is an error.
"""

import os
import re

import torch
import torch.nn as nn
from transformers import AutoConfig

from nanovlm import hf

LLAVA_HF = ("LlavaForConditionalGeneration", "LlavaNextVideoForConditionalGeneration")
LLAVA_ORIGINAL = {"LlavaLlamaForCausalLM": "LlamaForCausalLM", "LlavaQwenForCausalLM": "Qwen2ForCausalLM",
                  "LlavaMistralForCausalLM": "MistralForCausalLM"}
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                      "phi3": "Phi3ForCausalLM"}
# (a)'s vision prefixes, most specific first: the published layout, transformers >= 4.52, transformers 5
HF_VISION_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.",
                      "model.vision_tower.")


def _architecture(config):
    return (config.get("architectures") or [None])[0]


def read_llava(path) -> dict | None:
    """What the LLaVA checkpoint at `path` is, or None if it is not one: {"kind", "path", "holds" (the parts it
    has weights for), "settings" ({run setting: (value, where the checkpoint says it)}), "vision_tower" (the tower
    it names, (b)/(c))}. Raises ValueError, naming the setting, for what nanovlm cannot reproduce."""
    if not os.path.exists(path) or (os.path.isfile(path) and not os.path.basename(path).startswith("mm_projector")):
        return None  # a hub id (only a run's tower, never a LLaVA checkpoint here), or a file of another kind
    file = path if os.path.isfile(path) else os.path.join(path, "mm_projector.bin")
    directory = os.path.dirname(file)
    config = hf.read_config(directory) if os.path.isfile(os.path.join(directory, "config.json")) else {}
    architecture = _architecture(config)
    weights = any(n.startswith(("model.safetensors", "pytorch_model")) for n in os.listdir(directory))
    if os.path.isfile(file) and not weights:  # a stage-1 output: the projector alone
        info = {"kind": "projector", "path": file, "holds": {"projector"}}
    elif architecture in LLAVA_HF:
        return _read_hf(path, config)
    elif architecture in LLAVA_ORIGINAL:
        files = hf.CheckpointFiles(path).files
        vision = any(k.startswith("model.vision_tower.vision_tower.") for k in files)
        info = {"kind": "original", "path": path, "holds": {"projector", "lm"} | ({"vision"} if vision else set())}
    else:
        return None
    info["vision_tower"] = config.get("mm_vision_tower")
    projector = config.get("mm_projector_type", "linear" if "mm_hidden_size" in config else None)  # LLaVA's default
    pooled_before = config.get("mm_resampler_type") == "spatial_pool"  # LLaVA-NeXT-Video's; LLaVA-NeXT pools after
    _refuse(path, [
        (projector not in (None, "linear", "mlp2x_gelu"), f"mm_projector_type={projector!r}"),
        (config.get("mm_vision_select_feature", "patch") != "patch",
         f"mm_vision_select_feature={config.get('mm_vision_select_feature')!r} (nanovlm drops CLIP's class token)"),
        (pooled_before and config.get("mm_spatial_pool_mode", "average") != "average",
         f"mm_spatial_pool_mode={config.get('mm_spatial_pool_mode')!r}"),
        (not pooled_before and config.get("mm_spatial_pool_stride", 1) > 1, "mm_spatial_pool_stride without "
         "mm_resampler_type='spatial_pool' (it pools after the projector; nanovlm pools before)")])
    settings = {"projector": (projector, "mm_projector_type"),
                "vision_select_layer": (config.get("mm_vision_select_layer"), "mm_vision_select_layer"),
                "pool_stride": (config.get("mm_spatial_pool_stride") if pooled_before else None,
                                "mm_spatial_pool_stride")}
    info["settings"] = {k: v for k, v in settings.items() if v[0] is not None}
    return info


def _refuse(path, unsupported):
    """unsupported: (condition, the setting) pairs; the first that holds is a ValueError naming its setting."""
    for condition, setting in unsupported:
        if condition:
            raise ValueError(f"{path}: {setting} is not supported by nanovlm")


def _read_hf(path, config):
    cfg = AutoConfig.from_pretrained(path)
    vision = cfg.vision_config
    siglip = vision.model_type.startswith("siglip")
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    stride = cfg.spatial_pool_stride if _architecture(config) == "LlavaNextVideoForConditionalGeneration" else None
    _refuse(path, [
        (not isinstance(layer, int), f"vision_feature_layer={layer} (several layers)"),
        (strategy != ("full" if siglip else "default"), f"vision_feature_select_strategy={strategy!r} with a "
         f"{vision.model_type} tower (nanovlm drops CLIP's class token and keeps every SigLIP patch)"),
        (siglip and isinstance(layer, int) and layer % (vision.num_hidden_layers + 1) == vision.num_hidden_layers
         and not getattr(vision, "tie_last_hidden_states", None), f"vision_feature_layer={layer} of a SigLIP tower "
         "without vision_config.tie_last_hidden_states (nanovlm's last SigLIP layer includes post_layernorm)"),
        (cfg.projector_hidden_act != "gelu", f"projector_hidden_act={cfg.projector_hidden_act!r}"),
        (not getattr(cfg, "multimodal_projector_bias", True), "multimodal_projector_bias=False"),
        (getattr(cfg, "spatial_pool_mode", "average") != "average",
         f"spatial_pool_mode={getattr(cfg, 'spatial_pool_mode', None)!r}"),
        (stride and (vision.image_size // vision.patch_size) % stride, f"spatial_pool_stride={stride} on a "
         f"{vision.image_size // vision.patch_size}-patch grid (AvgPool2d drops the edge that nanovlm averages)")])
    settings = {"projector": ("mlp2x_gelu", "multi_modal_projector"),
                "vision_select_layer": (layer, "vision_feature_layer"), "pool_stride": (stride, "spatial_pool_stride")}
    return {"kind": "hf", "path": path, "holds": {"vision", "projector", "lm"}, "vision_tower": None,
            "settings": {k: v for k, v in settings.items() if v[0] is not None}}


def check_settings(info, **run):
    """The run's settings (projector, pool_stride, vision_select_layer, vision_path) against what the checkpoint
    fixes: a contradiction is a ValueError naming the setting and what to set."""
    for key, (value, source) in info["settings"].items():
        if key in run and run[key] != value:
            raise ValueError(f"init_from={info['path']} fixes {key}={value!r} ({source}); the run has "
                             f"{key}={run[key]!r}: set {key}={value!r}")
    tower, vision_path = info.get("vision_tower"), run.get("vision_path")
    if tower and vision_path and os.path.basename(tower.rstrip("/")) != os.path.basename(vision_path.rstrip("/")):
        raise ValueError(f"init_from={info['path']} was trained on the tower {tower} (mm_vision_tower); the run has "
                         f"vision_path={vision_path!r}: set vision_path to {tower} or a local copy named like it")


def tower_paths(info, vision_path, lm_path):
    """The run's (vision_path, lm_path) once it starts from this checkpoint: a llava-hf directory is both towers,
    an original checkpoint the LM (and the tower, where it holds a copy: see from_pretrained)."""
    return {"hf": (info["path"], info["path"]), "original": (vision_path, info["path"])}.get(
        info["kind"], (vision_path, lm_path))


# ----------------------------------------------------------------------------------------------------------------
# Configs: a tower path may be a llava-hf directory (vision and LM) or an original LLaVA checkpoint (LM);
# model.vlm_config reads the towers' configs through these

def vision_dict(path):
    config = hf.read_config(path)
    return AutoConfig.from_pretrained(path).vision_config.to_dict() if _architecture(config) in LLAVA_HF else config


def text_dict(path):
    config = hf.read_config(path)
    architecture = _architecture(config)
    if architecture in LLAVA_HF:
        text = AutoConfig.from_pretrained(path).text_config.to_dict()
        return {**text, "architectures": [TEXT_ARCHITECTURES.get(text["model_type"], text["model_type"])]}
    return {**config, "architectures": [LLAVA_ORIGINAL[architecture]]} if architecture in LLAVA_ORIGINAL else config


# ----------------------------------------------------------------------------------------------------------------
# Loading

def _locations(info, keys):
    """Where each part lives in this layout: (vision prefix, projector prefix, LM "model." prefix, LM head key)."""
    if info["kind"] == "original":
        return "model.vision_tower.vision_tower.vision_model.", "model.mm_projector.", "model.", "lm_head.weight"
    vision = next((p for p in HF_VISION_PREFIXES if any(k.startswith(p) for k in keys)), HF_VISION_PREFIXES[0])
    if any(k.startswith("model.language_model.") for k in keys):  # transformers >= 4.52
        return vision, "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"
    return vision, "multi_modal_projector.", "language_model.model.", "language_model.lm_head.weight"


def key_table(model, info, keys, parts):
    """(table, ignored) for hf.load_into over the model's `parts`, in this checkpoint's key names."""
    vision, projector, lm, head = _locations(info, keys)
    layer = {"0": "linear_1", "2": "linear_2"} if info["kind"] == "hf" else {"0": "0", "2": "2"}
    tables = {
        "vision": [(vision + h, o, r) for h, o, r in hf.vision_key_table(model.cfg.vision)],
        "projector": [(f"{projector}{layer[name.split('.')[0]]}.{name.split('.')[1]}", name, 0)
                      for name, _ in model.projector.named_parameters()],
        "lm": [(head if h == "lm_head.weight" else lm + h.removeprefix("model."), o, r)
               for h, o, r in hf.lm_key_table(model.cfg.lm, _architecture(text_dict(info["path"])))]}
    vision, projector, lm, head = map(re.escape, (vision, projector, lm, head))  # now patterns
    held = {"vision": [vision + ".*"], "projector": [projector + ".*"], "lm": [lm + ".*", head]}
    ignored = [r"(model\.)?image_newline"] + [p for part in info["holds"] - set(parts) for p in held[part]]
    ignored += [vision + p for p in hf.vision_ignored(model.cfg.vision)]
    ignored += [lm + r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", head]
    if info["kind"] == "original" and "vision" not in info["holds"]:
        ignored.append(r"model\.vision_tower\..*")  # a tower-less checkpoint may still carry its buffers
    table = [(h, f"{part}.{o}", r) for part in parts for h, o, r in tables[part]]
    return table, ignored


def load_llava(model, path, info=None, parts=None):
    """Fill `parts` of the model (default: every part the checkpoint holds) from the LLaVA checkpoint at `path`,
    strictly. The model's config must be the one the checkpoint and the run's settings give (vlm_config)."""
    info = info or read_llava(path)
    parts = sorted(parts or info["holds"])
    if info["kind"] == "projector":
        return _load_projector_file(model, info["path"])
    keys = hf.CheckpointFiles(path).files
    table, ignored = key_table(model, info, keys, parts)
    modules = nn.ModuleDict({part: getattr(model, part) for part in parts})  # the same parameters, named by part
    hf.load_into(modules, path, table, ignored)


@torch.no_grad()
def _load_projector_file(model, file):
    state = torch.load(file, map_location="cpu", weights_only=True)
    found = {k.split("mm_projector.", 1)[-1]: k for k in state}  # "model.mm_projector.0.weight" -> "0.weight"
    params = dict(model.projector.named_parameters())
    for name in params.keys() - found.keys():
        raise KeyError(f"{file}: missing tensor model.mm_projector.{name} (needed for projector.{name})")
    for name in found.keys() - params.keys():
        raise KeyError(f"{file}: unexpected tensor {found[name]}; it matches no parameter of the projector")
    for name, p in params.items():
        if state[found[name]].shape != p.shape:
            raise ValueError(f"{file}: {found[name]} {tuple(state[found[name]].shape)} does not fit projector.{name} "
                             f"{tuple(p.shape)}: it was trained for other towers")
    for name, p in params.items():  # each rank its rows, if sharded
        hf.copy_rows(p, p.shape[0], 0, lambda start, stop, t=state[found[name]]: t[start:stop])
