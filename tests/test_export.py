"""`python -m nanovlm.export` against transformers' LlavaNextVideoForConditionalGeneration, on tiny random towers and a
real video file (CPU, fp32, no network), and the round trip export -> init_from -> export."""

import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import save_file
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder

import prepare
import train
from conftest import run_args
from nanovlm import llava
from nanovlm.data import encode, load_tokenizer
from nanovlm.export import chat_template, export, main
from nanovlm.generate import load_final, prompt_ids
from nanovlm.media import frame_indices, load_preprocess, load_video
from nanovlm.model import VISUAL_TOKEN, VLM, from_pretrained, load_weights, normalize, vlm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What is happening?"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["What is happening? Pushing something from left to right.", "A red circle moves up, a blue square down.",
         "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
         "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"]


def make_final(out, vision_path, lm_path, projector="mlp2x_gelu", pool_stride=1, select_layer=-2, template="plain",
               num_frames=4, seed=0):
    """A run's final/ as train.py's end writes it: the projector and the LM trained (random here), the towers'
    paths and settings in nanovlm.json, the tokenizer."""
    torch.manual_seed(seed)
    model = from_pretrained(vision_path, lm_path, projector=projector, pool_stride=pool_stride,
                            select_layer=select_layer)
    trained = {name: (p + torch.randn_like(p) * 0.3 if name.startswith("lm") else torch.randn_like(p) * 0.3).detach()
               for name, p in model.named_parameters() if name.startswith(("projector", "lm"))}
    os.makedirs(out)
    save_file({k: v.contiguous() for k, v in trained.items()}, os.path.join(out, "trained.safetensors"))
    with open(os.path.join(out, "nanovlm.json"), "w") as f:
        json.dump({"vision_path": str(vision_path), "lm_path": str(lm_path), "projector": projector,
                   "pool_stride": pool_stride, "vision_select_layer": select_layer, "template": template,
                   "num_frames": num_frames}, f)
    load_tokenizer(lm_path).save_pretrained(out)
    return str(out)


def write_video(path, width, height, num_frames=24):
    """A square that moves left to right over a gradient, so that frames, and their order, differ."""
    frames = torch.zeros(num_frames, 3, height, width, dtype=torch.uint8)
    frames[:, 2] = torch.linspace(0, 200, width).to(torch.uint8)
    for t in range(num_frames):
        x = t * (width - 12) // num_frames
        frames[t, 0, height // 3:height // 3 + 12, x:x + 12] = 255
    VideoEncoder(frames, frame_rate=12).to_file(str(path))
    return str(path)


@pytest.fixture(scope="module")
def cases(synthetic, tmp_path_factory):
    """final/ directories: the demo (config/synthetic_video.py's settings on the demo towers), a CLIP-L-shaped
    model (select -2, stride 2, vicuna_v1, untied Llama) and a SigLIP-shaped one (its last layer, post-norm
    included; stride 2; the LM's chat template; tied Qwen2), each with a video file of its own size."""
    root = tmp_path_factory.mktemp("export")
    demo = runpy.run_path(os.path.join(REPO, "config", "synthetic_video.py"))
    settings = dict(pool_stride=demo["pool_stride"], select_layer=demo["vision_select_layer"],
                    template=demo["template"], num_frames=demo["num_frames"])
    finals = {"demo": (make_final(root / "demo", synthetic / "vision", synthetic / "lm", **settings),
                       str(synthetic / "20bn-something-something-v2" / "1.webm"))}
    tokenizer = prepare.train_tokenizer(TEXTS, root / "lm")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(root / "lm")
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(0)
    for name, lm, vision in (
            ("clip_l", tf.LlamaForCausalLM(tf.LlamaConfig(**sizes)),
             tf.CLIPVisionModel(tf.CLIPVisionConfig(**vit, image_size=56, patch_size=14))),
            ("siglip", tf.Qwen2ForCausalLM(tf.Qwen2Config(**sizes, tie_word_embeddings=True)),
             tf.SiglipVisionModel(tf.SiglipVisionConfig(**vit, image_size=32, patch_size=8)))):
        with torch.no_grad():
            for p in [*lm.parameters(), *vision.parameters()]:
                p.normal_(0, 0.3)
        lm.save_pretrained(root / f"{name}_lm")
        tokenizer.save_pretrained(root / f"{name}_lm")
        vision.save_pretrained(root / f"{name}_vision")
    finals["clip_l"] = (make_final(root / "clip_l", root / "clip_l_vision", root / "clip_l_lm", pool_stride=2,
                                   select_layer=-2, template="vicuna_v1"), write_video(root / "clip_l.webm", 80, 48))
    finals["siglip"] = (make_final(root / "siglip", root / "siglip_vision", root / "siglip_lm", pool_stride=2,
                                   select_layer=-1, template="chat"), write_video(root / "siglip.webm", 40, 40))
    return finals


def processor_inputs(out, raw, conversation):
    """transformers' own processor on the exported directory (it needs torchvision). The chat template writes every
    special token itself, so its text is tokenized without adding any (as vLLM's chat endpoint does)."""
    pytest.importorskip("torchvision")
    processor = tf.AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return processor(text=prompt, videos=[raw], return_tensors="pt", add_special_tokens=False)


def replica_inputs(out, raw, conversation):
    """What LlavaNextVideoProcessor does with the exported files, step by step (for machines without torchvision):
    the chat template, each <video> expanded to (S // patch_size)^2 // 4 tokens per frame, frames resized with
    torchvision's kernel for uint8 tensors (bilinear, antialiased) and normalised as (x - mean*255) / (std*255)."""
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    with open(os.path.join(out, "processor_config.json")) as f:
        config = json.load(f)
    video = config["video_processor"]
    S = video["size"]["height"]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt = prompt.replace("<video>", "<video>" * ((S // config["patch_size"]) ** 2 // 4 * len(raw)))
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert video["resample"] == 2 and not video["do_center_crop"]
    pixels = F.interpolate(raw, size=(S, S), mode="bilinear", antialias=True).float()
    mean = torch.tensor(video["image_mean"]).view(3, 1, 1) / video["rescale_factor"]
    std = torch.tensor(video["image_std"]).view(3, 1, 1) / video["rescale_factor"]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": ((pixels - mean) / std)[None]}


def assert_export_matches_transformers(final, video, out, inputs, name):
    """The exported directory in transformers, on a video file through the exported processor: the prompt tokens
    equal nanovlm's, logits within 1e-4 of nanovlm's on the same frames, the same greedy answer token for token."""
    assert main(["--ckpt", final, "--out", out]) == 0
    model, tokenizer, info = load_final(final)
    frames = load_video(video, info["num_frames"], load_preprocess(info["vision_path"]))
    ids = prompt_ids(QUESTION, "video", tokenizer, info, model.cfg.tokens_per_frame)
    decoder = VideoDecoder(video, seek_mode="approximate")  # the frames load_video takes, undecoded by nanovlm
    raw = decoder.get_frames_at(frame_indices(decoder.metadata.num_frames, info["num_frames"])).data
    conversation = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "video"}]}]
    theirs_in = inputs(out, raw, conversation)
    reference = tf.LlavaNextVideoForConditionalGeneration.from_pretrained(out).eval()
    assert theirs_in["input_ids"][0].tolist() == ids.masked_fill(ids == VISUAL_TOKEN,
                                                                reference.config.video_token_index).tolist()
    with torch.no_grad():
        ours = model(ids[None], frames)
        theirs = reference(**theirs_in).logits[..., :model.cfg.lm.vocab_size]
        normalised = normalize(frames, model.cfg)  # what nanovlm feeds its tower
        same_frames = reference(input_ids=theirs_in["input_ids"], pixel_values_videos=normalised[None]).logits
    difference = (ours - theirs).abs().max().item()
    same = (ours - same_frames[..., :model.cfg.lm.vocab_size]).abs().max().item()
    print(f"{name} {inputs.__name__}: max |logit difference| {difference:.2e}; on nanovlm's own frames {same:.2e}")
    assert difference <= 1e-4 and same <= 1e-5
    answer = model.generate([ids], frames, 12)[0]  # 12 tokens, past any end of answer: an untrained LM ends at once
    reference.generation_config.eos_token_id = None
    generated = reference.generate(**theirs_in, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    print(f"{name}: greedy answer {answer}, identical: {generated == answer}")
    assert generated == answer


@pytest.mark.parametrize("inputs", [processor_inputs, replica_inputs], ids=["processor", "replica"])
@pytest.mark.parametrize("case", ["demo", "clip_l", "siglip"])
def test_export_matches_transformers_on_a_video_file(cases, tmp_path, case, inputs):
    assert_export_matches_transformers(*cases[case], str(tmp_path / "hf"), inputs, case)


@pytest.mark.slow
@pytest.mark.parametrize("inputs", [processor_inputs, replica_inputs], ids=["processor", "replica"])
def test_demo_trained_by_train_py_exports(synthetic, tmp_path, inputs):
    """The same for a final/ that train.py wrote: config/synthetic_video.py, 2 steps."""
    args = run_args(synthetic, tmp_path / "run", max_steps=2, num_frames=8, max_tokens=256, train_vision=False)
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "config/synthetic_video.py", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    video = str(synthetic / "20bn-something-something-v2" / "1.webm")
    final = str(tmp_path / "run" / "final")
    assert_export_matches_transformers(final, video, str(tmp_path / "hf"), inputs, "trained demo")


@pytest.mark.parametrize("case", ["demo", "clip_l", "siglip"])
def test_export_init_from_export_is_byte_identical(cases, synthetic, tmp_path, case):
    """final -> export -> a fresh model from the export, through train.py's --init_from -> export again:
    the same safetensors bytes; the same hidden states, bit for bit, and logits; the exported tokenizer (its chat
    template wrapped) encodes a training conversation as the run's did."""
    final, video = cases[case]
    model, tokenizer, info = load_final(final)
    export(model, tokenizer, info, tmp_path / "first")
    first = str(tmp_path / "first")
    checkpoint = llava.read_llava(first)
    assert checkpoint["kind"] == "hf" and checkpoint["holds"] == {"vision", "projector", "lm"}
    # what train.py does with --init_from=first: the settings checked, the towers taken from it, then loaded
    c = train.settings(run_args(synthetic, tmp_path / "run", init_from=first, projector=info["projector"],
                                pool_stride=info["pool_stride"], vision_select_layer=info["vision_select_layer"]))
    assert c.vision_path == c.lm_path == first
    with torch.device("meta"):
        again = VLM(vlm_config(c.vision_path, c.lm_path, c.projector, c.pool_stride, c.vision_select_layer))
    again.to_empty(device="cpu")
    load_weights(again, c.vision_path, c.lm_path, c.seed, trained=c.init_from)
    exported_tokenizer = tf.AutoTokenizer.from_pretrained(first)
    conversation = [{"from": "human", "value": QUESTION + "\n<video>"}, {"from": "gpt", "value": "Holding something."}]
    template = info["template"]
    assert encode(conversation, exported_tokenizer, template) == encode(conversation, tokenizer, template)
    export(again.eval(), exported_tokenizer, {**info, "vision_path": first, "lm_path": first}, tmp_path / "second")
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == \
        (tmp_path / "second" / "model.safetensors").read_bytes()
    frames = load_video(video, info["num_frames"], load_preprocess(info["vision_path"]))
    ids = prompt_ids(QUESTION, "video", tokenizer, info, model.cfg.tokens_per_frame)
    with torch.no_grad():
        hidden = [m.lm(m.embed(ids[None], frames)) for m in (model, again)]
        logits = [m.lm.logits(h)[..., :model.cfg.lm.vocab_size] for m, h in zip((model, again), hidden)]
    assert torch.equal(hidden[0], hidden[1])
    # the head gained the <video>/<image> rows: a matmul of another shape may round its last bit otherwise
    difference = (logits[0] - logits[1]).abs().max().item()
    print(f"{case} round trip: max |logit difference| {difference:.2e}")
    assert difference <= 1e-6


def test_chat_templates_take_content_lists_the_way_vllm_detects_them(cases):
    """vLLM passes OpenAI-style content lists ({"type": "video"}, {"type": "text", ...}) to a chat template only if it
    finds `for m in messages` and a loop over `m['content']` in it (vllm/entrypoints/chat_utils.py); otherwise it
    flattens the content to "<video>\\n" + text, placeholder first, which is not how nanovlm trained."""
    jinja2 = pytest.importorskip("jinja2")
    tokenizer = tf.AutoTokenizer.from_pretrained(cases["siglip"][0])  # has a chat template of its own
    for template in ("plain", "vicuna_v1", "chat"):
        loops = list(jinja2.Environment().parse(chat_template(template, tokenizer)).find_all(jinja2.nodes.For))
        messages = {loop.target.name for loop in loops if getattr(loop.iter, "name", None) == "messages"}
        assert any(isinstance(loop.iter, jinja2.nodes.Getitem) and getattr(loop.iter.node, "name", None) in messages
                   and getattr(loop.iter.arg, "value", None) == "content" for loop in loops), template


@pytest.mark.parametrize("case", ["demo", "clip_l", "siglip"])
def test_export_is_complete_and_sharded_above_max_shard_size(cases, tmp_path, case):
    final, _ = cases[case]
    assert main(["--ckpt", final, "--out", str(tmp_path / "sharded"), "--max_shard_size", "40KB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    prefixes = ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                "language_model.lm_head.", "image_newline")
    assert all(key.startswith(prefixes) for key in index["weight_map"])  # the names vLLM's loader maps
    unused = {"demo": "post_layernorm.weight", "clip_l": "encoder.layers.2.mlp.fc1.weight", "siglip": "head.probe"}
    assert "vision_tower.vision_model." + unused[case] in index["weight_map"]  # never run by nanovlm: from the tower
    _, loading = tf.LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "sharded",
                                                                          output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched tensor


@pytest.mark.parametrize("change, message", [
    (dict(projector="linear"), "projector='linear' cannot be exported: .* train with projector='mlp2x_gelu'"),
    (dict(pool_stride=3), "pool_stride=3 does not divide the 4x4 patch grid")])
def test_settings_that_would_not_export_exactly_are_one_line_errors(cases, tmp_path, change, message, capsys):
    final, _ = cases["clip_l"]
    with open(os.path.join(final, "nanovlm.json")) as f:
        info = json.load(f)
    settings = {"projector": info["projector"], "pool_stride": info["pool_stride"], **change}
    bad = make_final(tmp_path / "final", info["vision_path"], info["lm_path"], **settings,
                     select_layer=info["vision_select_layer"], template=info["template"])
    assert main(["--ckpt", bad, "--out", str(tmp_path / "hf")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("error: ")
    assert re.search(message, error), error


def test_cli_runs_as_a_module(cases, tmp_path):
    final, _ = cases["demo"]
    result = subprocess.run([sys.executable, "-m", "nanovlm.export", "--ckpt", final, "--out", str(tmp_path / "hf"),
                             "--dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["spatial_pool_stride"] == 4
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "default"
