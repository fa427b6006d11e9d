"""Starting from published LLaVA weights (nanovlm/llava.py): each layout built here from tiny random towers, loaded,
and compared with a nanovlm model that holds the same weights (CPU, fp32, no network)."""

import json
import os
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from nanovlm import hf, llava
from nanovlm.model import VISUAL_TOKEN, from_pretrained

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
           patch_size=8)
LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128)
IMAGE_TOKEN, VIDEO_TOKEN = 126, 127


def randomize(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A CLIP tower, a second one of the same shape (the copy an original checkpoint holds), and a Llama."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    for name in ("clip-vit-tiny", "clip-vit-tiny-finetuned"):
        randomize(tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT))).save_pretrained(root / name)
    randomize(tf.LlamaForCausalLM(tf.LlamaConfig(**LM))).save_pretrained(root / "llama")
    projector = {"0.weight": torch.randn(48, 32) * 0.3, "0.bias": torch.randn(48) * 0.3,
                 "2.weight": torch.randn(48, 48) * 0.3, "2.bias": torch.randn(48) * 0.3}
    return root, projector


def reference(vision_path, lm_path, projector, **settings):
    """A nanovlm model holding the weights a checkpoint was made of."""
    model = from_pretrained(str(vision_path), str(lm_path), **settings).eval()
    with torch.no_grad():
        for name, p in model.projector.named_parameters():
            p.copy_(projector[name])
    return model


def batch(model):
    """A prompt with two frames' visual tokens, and the frames."""
    torch.manual_seed(5)
    ids = torch.tensor([[3, 9] + [VISUAL_TOKEN] * (model.cfg.tokens_per_frame * 2) + [17, 4, 60]])
    return ids, torch.randn(2, 3, 32, 32)


def logits(model):
    with torch.no_grad():
        return model(*batch(model))


def assert_close(actual, expected, atol, what):
    difference = (actual - expected).abs().max().item()
    print(f"{what}: max |logit difference| {difference:.2e}")  # shown with -s
    assert difference <= atol


def imported(path, vision_path=None, lm_path=None, **run):
    """What train.py does for init_from=path: read the checkpoint, check the run's settings against it, take the
    tower paths it gives, load the towers from them, then the projector from the checkpoint."""
    info = llava.read_llava(str(path))
    run = {"projector": "mlp2x_gelu", "pool_stride": 1, "vision_select_layer": -2, **run,
           **{key: value for key, (value, _) in info["settings"].items()}}  # the user sets what the checkpoint fixes
    llava.check_settings(info, vision_path=vision_path, **run)
    vision_path, lm_path = llava.tower_paths(info, vision_path, lm_path)
    model = from_pretrained(str(vision_path), str(lm_path), projector=run["projector"],
                                  pool_stride=run["pool_stride"], select_layer=run["vision_select_layer"])
    llava.load_llava(model, str(path), info, parts={"projector"})
    return model.eval(), info


def rename(path, rule):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({rule(k): v for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))


LAYOUTS = {  # transformers 5.24's save_pretrained, the published llava-hf layout, transformers 4.52 - 4.5x
    "transformers5": lambda k: k,
    "published": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
    "transformers4.52": lambda k: ("lm_head." + k.removeprefix("language_model.lm_head.")) if "lm_head" in k else
    "model." + k.replace("vision_tower.", "vision_tower.vision_model.", 1).replace("language_model.model.",
                                                                                  "language_model.", 1)}


def llava_hf(towers, out, architecture, layout, pool_stride=2):
    """A llava-hf checkpoint of the towers and projector, saved by transformers, its keys renamed to `layout`;
    and transformers' model itself."""
    root, projector = towers
    configs = dict(vision_config=tf.CLIPVisionConfig(**VIT), text_config=tf.LlamaConfig(**LM),
                   image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    if architecture == "LlavaNextVideoForConditionalGeneration":
        configs.update(video_token_id=VIDEO_TOKEN, spatial_pool_stride=pool_stride)
    model = getattr(tf, architecture)(getattr(tf, architecture).config_class(**configs)).eval()
    model.model.vision_tower.load_state_dict(tf.CLIPVisionModel.from_pretrained(root / "clip-vit-tiny").state_dict())
    lm = tf.LlamaForCausalLM.from_pretrained(root / "llama")
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    with torch.no_grad():
        for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
            getattr(model.model.multi_modal_projector, theirs).weight.copy_(projector[f"{ours}.weight"])
            getattr(model.model.multi_modal_projector, theirs).bias.copy_(projector[f"{ours}.bias"])
    model.save_pretrained(out)
    rename(out, LAYOUTS[layout])
    return model


@pytest.mark.parametrize("architecture, layout", [
    ("LlavaNextVideoForConditionalGeneration", "transformers5"),
    ("LlavaNextVideoForConditionalGeneration", "published"),
    ("LlavaNextVideoForConditionalGeneration", "transformers4.52"),
    ("LlavaForConditionalGeneration", "published")])
def test_llava_hf_directory_loads_tower_projector_and_lm(towers, tmp_path, architecture, layout):
    theirs = llava_hf(towers, tmp_path, architecture, layout)
    model, info = imported(tmp_path)
    assert info["kind"] == "hf" and info["holds"] == {"vision", "projector", "lm"}
    stride = 2 if "NextVideo" in architecture else 1
    assert model.cfg.pool_stride == stride and model.cfg.vision.select_layer == -2
    expected = reference(towers[0] / "clip-vit-tiny", towers[0] / "llama", towers[1], pool_stride=stride)
    assert_close(logits(model), logits(expected), 1e-5, f"{architecture} {layout} vs nanovlm")
    ids, frames = batch(model)  # and it is transformers' model: a video of 2 frames, or LLaVA-1.5's 2 images
    video = "NextVideo" in architecture
    with torch.no_grad():
        hf_logits = theirs(input_ids=ids.masked_fill(ids == VISUAL_TOKEN, VIDEO_TOKEN if video else IMAGE_TOKEN),
                           **{"pixel_values_videos": frames[None]} if video else {"pixel_values": frames}).logits
    assert_close(logits(model), hf_logits, 1e-4, f"{architecture} {layout} vs transformers")


def original_llava(towers, out, with_tower, **config):
    """An original LLaVA checkpoint: the Llama's tensors, model.mm_projector.*, mm_* settings; with its own
    (here: a different) copy of the tower where `with_tower`."""
    root, projector = towers
    shutil.copytree(root / "llama", out)
    settings = hf.read_config(out)
    settings.update(dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                         mm_vision_tower="openai/clip-vit-tiny", mm_vision_select_layer=-2,
                         mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", mm_hidden_size=32,
                         mm_patch_merge_type="flat"), **config)
    (out / "config.json").write_text(json.dumps(settings))
    tensors = load_file(out / "model.safetensors")
    tensors.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
    if with_tower:
        tower = load_file(root / "clip-vit-tiny-finetuned" / "model.safetensors")
        tensors.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()})
        os.remove(out / "model.safetensors")
        torch.save(tensors, out / "pytorch_model.bin")  # LLaVA v1.5 ships .bin files
    else:
        save_file(tensors, out / "model.safetensors")


@pytest.mark.parametrize("with_tower", [False, True], ids=["tower_named", "tower_held"])
def test_original_llava_checkpoint_loads_projector_and_lm(towers, tmp_path, with_tower):
    original_llava(towers, tmp_path / "llava-v1.5", with_tower)
    vision_path = towers[0] / "clip-vit-tiny"
    model, info = imported(tmp_path / "llava-v1.5", vision_path=str(vision_path))
    assert info["kind"] == "original" and info["vision_tower"] == "openai/clip-vit-tiny"
    tower = "clip-vit-tiny-finetuned" if with_tower else "clip-vit-tiny"  # the checkpoint's copy wins
    expected = reference(towers[0] / tower, towers[0] / "llama", towers[1])
    assert_close(logits(model), logits(expected), 1e-5, f"original ({tower}) vs nanovlm")


@pytest.mark.parametrize("where", ["file", "directory"])
def test_stage1_projector_file_loads_the_projector(towers, tmp_path, where):
    root, projector = towers
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, tmp_path / "mm_projector.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-tiny", "mm_hidden_size": 32}))
    path = tmp_path / "mm_projector.bin" if where == "file" else tmp_path
    model, info = imported(path, vision_path=str(root / "clip-vit-tiny"), lm_path=str(root / "llama"))
    assert info["kind"] == "projector" and info["holds"] == {"projector"}
    expected = reference(root / "clip-vit-tiny", root / "llama", projector)
    assert_close(logits(model), logits(expected), 1e-5, f"mm_projector.bin ({where}) vs nanovlm")


def test_removed_or_extra_tensor_is_an_error_naming_it(towers, tmp_path):
    root = towers[0]
    llava_hf(towers, tmp_path / "hf", "LlavaNextVideoForConditionalGeneration", "published")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors.pop("multi_modal_projector.linear_2.bias")
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing tensor multi_modal_projector\.linear_2\.bias"):
        imported(tmp_path / "hf")
    tensors["multi_modal_projector.linear_2.bias"], tensors["multi_modal_projector.linear_3.bias"] = \
        torch.zeros(48), torch.zeros(48)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(KeyError, match=r"unexpected tensor multi_modal_projector\.linear_3\.bias"):
        imported(tmp_path / "hf")

    original_llava(towers, tmp_path / "original", with_tower=False)
    tensors = load_file(tmp_path / "original" / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "original" / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        imported(tmp_path / "original", vision_path=str(root / "clip-vit-tiny"))

    torch.save({f"model.mm_projector.{k}": v for k, v in towers[1].items() if k != "2.bias"},
               tmp_path / "mm_projector.bin")
    with pytest.raises(KeyError, match=r"missing tensor model\.mm_projector\.2\.bias"):
        imported(tmp_path / "mm_projector.bin", vision_path=str(root / "clip-vit-tiny"), lm_path=str(root / "llama"),
                 projector="mlp2x_gelu")


def test_settings_fixed_by_the_checkpoint_contradicting_the_run_are_errors(towers, tmp_path):
    llava_hf(towers, tmp_path / "hf", "LlavaNextVideoForConditionalGeneration", "published", pool_stride=2)
    info = llava.read_llava(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"fixes pool_stride=2 \(spatial_pool_stride\); the run has pool_stride=4: "
                                         r"set pool_stride=2"):
        llava.check_settings(info, pool_stride=4, vision_select_layer=-2, projector="mlp2x_gelu")
    with pytest.raises(ValueError, match=r"fixes vision_select_layer=-2 \(vision_feature_layer\)"):
        llava.check_settings(info, pool_stride=2, vision_select_layer=-1, projector="mlp2x_gelu")
    original_llava(towers, tmp_path / "original", with_tower=False)
    info = llava.read_llava(str(tmp_path / "original"))
    with pytest.raises(ValueError, match=r"trained on the tower openai/clip-vit-tiny \(mm_vision_tower\); the run has "
                                         r"vision_path='data/synthetic/vision'"):
        llava.check_settings(info, vision_path="data/synthetic/vision")
    with pytest.raises(ValueError, match=r"fixes projector='mlp2x_gelu' \(mm_projector_type\)"):
        llava.check_settings(info, projector="linear")


@pytest.mark.parametrize("config, message", [
    (dict(mm_vision_select_feature="cls_patch"), "mm_vision_select_feature='cls_patch'"),
    (dict(mm_projector_type="mlp3x_gelu"), "mm_projector_type='mlp3x_gelu'"),
    (dict(mm_spatial_pool_stride=2, mm_spatial_pool_mode="bilinear"), "pools after the projector"),
    (dict(mm_resampler_type="spatial_pool", mm_spatial_pool_mode="max"), "mm_spatial_pool_mode='max'")])
def test_what_nanovlm_cannot_run_the_same_way_is_an_error_naming_the_setting(towers, tmp_path, config, message):
    original_llava(towers, tmp_path / "original", with_tower=False, **config)
    with pytest.raises(ValueError, match=message):
        llava.read_llava(str(tmp_path / "original"))


def test_siglip_read_with_the_class_token_strategy_is_an_error(towers, tmp_path):
    config = tf.LlavaNextVideoConfig(vision_config=tf.SiglipVisionConfig(**VIT), text_config=tf.LlamaConfig(**LM),
                                     vision_feature_select_strategy="default")
    config.architectures = ["LlavaNextVideoForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='default' with a siglip_vision_model tower"):
        llava.read_llava(str(tmp_path))
