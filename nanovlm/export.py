"""Export a trained run as a Hugging Face `LlavaNextVideoForConditionalGeneration` directory (transformers, vLLM):

    python -m nanovlm.export --ckpt out/RUN/final --out DIR [--dtype bfloat16] [--max_shard_size 5GB]

What is notable:
- That class runs video exactly as nanovlm does (`hidden_states[vision_feature_layer]`, CLIP's class token dropped,
  AvgPool2d, linear_1 -> gelu -> linear_2, frames in time order). What would not give the same logits is an error
  naming the setting: the linear projector; a stride that does not divide the patch grid (AvgPool2d floors, nanovlm
  keeps the edge). A SigLIP tower read at its last layer gets `tie_last_hidden_states` (its post-norm included).
- Every tensor, under the published llava-hf names (`vision_tower.vision_model.*`, `language_model.model.*`: what
  vLLM's loader takes; transformers reads them too): the run's, and the tower's that nanovlm never runs (blocks
  after the selected layer, CLIP's post-LayerNorm, SigLIP's head), copied from the tower's checkpoint.
- `<video>` and `<image>` become tokens. An LM without spare rows grows by theirs, each the mean of the other rows:
  its logit h.mean(W) is the mean of the logits, so greedy decoding never picks it.
- Frames are resized whole (bilinear, antialiased: media.normalize's kernel; no crop). LlavaNextVideoProcessor
  counts (S/patch_size)^2 // 4 tokens per frame whatever the stride, so its `patch_size` is set to make that right.
- The chat template renders a conversation as the run's template did (`plain`, `vicuna_v1`, or the LM's own given
  "text\\n<video>"); tokenized without added special tokens, as vLLM's chat endpoint does.
"""

import argparse
import copy
import json
import os
import sys

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import LlavaNextVideoConfig

from nanovlm import hf, llava
from nanovlm.records import VICUNA_SYSTEM, leading_bos
from nanovlm.generate import load_final
from nanovlm.media import load_preprocess

MEDIA_TOKENS = ("<video>", "<image>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# user turn text, then "\n<video>" per media part (generate.prompt_ids' layout); media(): the placeholders alone
MACROS = ("{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
          "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
          "{%- for c in m['content'] if c['type'] in ['video', 'image'] -%}{{ '\\n<' + c['type'] + '>' }}"
          "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
          "{%- macro media(m) -%}{%- if m['content'] is string -%}{{ '<video>' * m['content'].count('<video>') + "
          "'<image>' * m['content'].count('<image>') }}{%- else -%}{%- for c in m['content'] if c['type'] in "
          "['video', 'image'] -%}{{ '<' + c['type'] + '>' }}{%- endfor -%}{%- endif -%}{%- endmacro -%}")
WRAPPED = "{#- nanovlm: media after the text -#}"


def check_exportable(cfg):
    if cfg.projector != "mlp2x_gelu":
        raise ValueError(f"projector={cfg.projector!r} cannot be exported: LlavaNextVideoForConditionalGeneration's "
                         f"projector is linear_1 -> gelu -> linear_2; train with projector='mlp2x_gelu'")
    if cfg.vision.grid % cfg.pool_stride:
        raise ValueError(f"pool_stride={cfg.pool_stride} does not divide the {cfg.vision.grid}x{cfg.vision.grid} "
                         f"patch grid: transformers and vLLM pool with AvgPool2d, which drops the edge nanovlm "
                         f"averages; train with a pool_stride that divides {cfg.vision.grid}")


def split_rows(table, params, prefix, key_prefix=""):
    """The inverse of hf.load_into: each checkpoint tensor of `table` cut back out of the rows it tiles."""
    starts = {}
    for _, ours, row in table:
        starts.setdefault(ours, []).append(row)
    out = {}
    for theirs, ours, row in table:
        p = params[prefix + ours]
        end = min([s for s in starts[ours] if s > row], default=p.shape[0])
        out[key_prefix + theirs] = p[row:end]
    return out


def tower_tensors(vision_path):
    """The vision model's tensors as its checkpoint holds them (vision_model-relative names): a tower, a full
    CLIPModel/SiglipModel, or a llava-hf directory."""
    files = hf.CheckpointFiles(vision_path)
    prefixes = llava.HF_VISION_PREFIXES if llava.read_llava(vision_path) else ("vision_model.", "")
    prefix = next(p for p in prefixes if any(k.startswith(p) for k in files.files))
    return {k[len(prefix):]: files.get(k) for k in files.files
            if k.startswith(prefix) and not k.startswith("text_model.") and not k.endswith("position_ids")}


def llava_tensors(model, info, new_rows, dtype):
    """Every tensor of the exported model, in the published llava-hf names."""
    cfg, params = model.cfg, model.state_dict()
    tensors = {"vision_tower.vision_model." + k: t for k, t in tower_tensors(info["vision_path"]).items()}
    tensors.update(split_rows(hf.vision_key_table(cfg.vision), params, "vision.", "vision_tower.vision_model."))
    architecture = llava.text_dict(info["lm_path"])["architectures"][0]
    lm = split_rows(hf.lm_key_table(cfg.lm, architecture), params, "lm.", "language_model.")
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in lm and new_rows:  # rows for <video>/<image>: see the module docstring
            lm[key] = torch.cat([lm[key], lm[key].mean(0, keepdim=True).expand(new_rows, -1)])
    tensors.update(lm)
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for s in ("weight", "bias"):
            tensors[f"multi_modal_projector.{theirs}.{s}"] = params[f"projector.{ours}.{s}"]
    tensors["image_newline"] = torch.zeros(cfg.lm.dim)  # LLaVA-NeXT's image AnyRes only; the video path never uses it
    return {k: t.detach().to(dtype, copy=True).contiguous() for k, t in sorted(tensors.items())}


def chat_template(template, tokenizer):
    """The Jinja chat template that renders a conversation as nanovlm's `template` does (records.encode)."""
    bos = "{{ bos_token }}" if leading_bos(tokenizer, template) else ""
    turns = {"plain": ("media(m)", "content(m) + eos_token"),  # stage 1: the question is dropped
             "vicuna_v1": ("'USER: ' + content(m) + ' ASSISTANT:'", "' ' + content(m) + eos_token")}
    if template in turns:
        user, assistant = turns[template]
        system = ("{{ content(messages[0]) if messages[0]['role'] == 'system' else " + json.dumps(VICUNA_SYSTEM) +
                  " }}{{ ' ' }}") if template == "vicuna_v1" else ""
        return (MACROS + bos + system + "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ " + user +
                " }}{%- elif m['role'] == 'assistant' -%}{{ " + assistant + " }}{%- endif -%}{%- endfor -%}")
    if tokenizer.chat_template.startswith(WRAPPED):  # exported before: already fed "text\n<video>"
        return tokenizer.chat_template
    return (WRAPPED + MACROS + "{%- set ns = namespace(messages=[]) -%}{%- for m in messages -%}"
            "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': content(m)}] -%}{%- endfor -%}"
            "{%- with messages = ns.messages -%}" + tokenizer.chat_template + "{%- endwith -%}")


def processor_config(cfg, preprocess, num_frames):
    """LlavaNextVideoProcessor's config (the image and video processors nested, as transformers 5 writes it)."""
    S, per_side = preprocess.size, cfg.vision.grid // cfg.pool_stride
    # the processor counts (S // patch_size)^2 // 4 tokens per frame: pick patch_size so that is per_side^2
    patch_size = next((p for p in range(S, 0, -1) if S // p == 2 * per_side), None)
    if patch_size is None:
        raise ValueError(f"no processor patch_size gives {per_side}x{per_side} video tokens per {S}px frame")
    common = {"size": {"height": S, "width": S}, "crop_size": {"height": S, "width": S}, "do_resize": True,
              "resample": 2, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(preprocess.mean), "image_std": list(preprocess.std),
              "do_convert_rgb": True}  # resample 2: PIL's BILINEAR, antialiased on tensors
    return {"processor_class": "LlavaNextVideoProcessor", "patch_size": patch_size, "video_token": "<video>",
            "image_token": "<image>", "vision_feature_select_strategy": "default" if cfg.vision.class_token else "full",
            "num_additional_image_tokens": int(cfg.vision.class_token),
            "image_processor": {**common, "image_processor_type": "LlavaNextImageProcessor", "do_pad": True,
                                "image_grid_pinpoints": [[S, S]]},
            "video_processor": {**common, "video_processor_type": "LlavaNextVideoVideoProcessor",
                                "do_sample_frames": False, "num_frames": num_frames}}


def llava_config(cfg, info, tokenizer, new_rows, dtype):
    """config.json: the towers' own configs, and nanovlm's video path in LlavaNextVideo's settings."""
    vision = llava.vision_dict(info["vision_path"])
    vision = {**vision.get("vision_config", vision),  # a full CLIPModel / SiglipModel nests it
              "model_type": "clip_vision_model" if cfg.vision.class_token else "siglip_vision_model"}
    if cfg.vision.post_norm:
        vision["tie_last_hidden_states"] = True
    text = {k: v for k, v in llava.text_dict(info["lm_path"]).items() if not k.startswith("mm_")}
    text["vocab_size"] = cfg.lm.vocab_size + new_rows
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS}
    config = LlavaNextVideoConfig(
        vision_config=vision, text_config=text, video_token_index=ids["<video>"], image_token_index=ids["<image>"],
        projector_hidden_act="gelu", multimodal_projector_bias=True, vision_feature_layer=cfg.vision.select_layer,
        vision_feature_select_strategy="default" if cfg.vision.class_token else "full", spatial_pool_mode="average",
        spatial_pool_stride=cfg.pool_stride, image_grid_pinpoints=[[cfg.vision.image_size] * 2],
        image_seq_length=cfg.vision.grid ** 2, video_seq_length=cfg.tokens_per_frame * info["num_frames"],
        tie_word_embeddings=cfg.lm.tie_embeddings)
    config.architectures, config.dtype = ["LlavaNextVideoForConditionalGeneration"], dtype
    return config


def export(model, tokenizer, info, out, dtype=torch.float32, max_shard_size="5GB"):
    """Write the LlavaNextVideoForConditionalGeneration directory `out` for a nanovlm model (towers loaded, trained
    weights overlaid: generate.load_final) and its run's nanovlm.json `info`. Raises ValueError for a setting
    that would not export exactly."""
    cfg = model.cfg
    check_exportable(cfg)
    if os.path.isdir(out) and os.listdir(out):  # stale shards or an index would be read with the new files
        raise ValueError(f"--out {out} exists and is not empty: remove it or choose another directory")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS
                          if t not in tokenizer.get_vocab()])
    new_rows = max(0, len(tokenizer) - cfg.lm.vocab_size)
    tensors = llava_tensors(model, info, new_rows, dtype)
    os.makedirs(out, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for file, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(out, file), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                       "weight_map": split.tensor_to_filename}, f, indent=2)

    llava_config(cfg, info, tokenizer, new_rows, dtype).save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}, f, indent=2)

    tokenizer.chat_template = chat_template(info["template"], tokenizer)
    tokenizer.save_pretrained(out)
    processor = processor_config(cfg, load_preprocess(info["vision_path"]), info["num_frames"])
    files = {"processor_config.json": processor, "preprocessor_config.json": processor["image_processor"],
             "video_preprocessor_config.json": processor["video_processor"]}  # the last two: older transformers'
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description="export a trained run as a Hugging Face LLaVA-NeXT-Video model")
    parser.add_argument("--ckpt", required=True, help="a training run's out_dir/final")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--max_shard_size", default="5GB", help="larger models are written in shards of this size")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, info = load_final(args.ckpt)
        export(model, tokenizer, info, args.out, DTYPES[args.dtype], args.max_shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.cfg.vision.post_norm:
        print("note: vLLM's llava_next_video runs SigLIP without post_layernorm, so its answers differ from "
              "nanovlm's for vision_select_layer=-1; transformers' are the same", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
