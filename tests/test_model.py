"""The hand-written towers against transformers on tiny random checkpoints (CPU, fp32, no network)."""

import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file

from nanovlm import hf
from nanovlm.lm import LM, attention_meta
from nanovlm.model import VISUAL_TOKEN, from_pretrained, sample
from nanovlm.vision import VisionTower

torch.manual_seed(0)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
           patch_size=8)
LM_SIZES = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128)
LM_CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama3_rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_bias": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(attention_bias=True)),
    "qwen2_tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=5)),
    "phi3_longrope": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(
        partial_rotary_factor=0.5, max_position_embeddings=64, original_max_position_embeddings=16,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.3, 1.7], long_factor=[2.0, 3.0, 5.0]),
        pad_token_id=0, eos_token_id=2, bos_token_id=1)),
}


def randomize(model):
    """transformers zero-initialises biases and sets norms to one; random values make the comparison meaningful."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def save_hf(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    dirs = {}
    for name, (config_cls, model_cls, extra) in LM_CASES.items():
        torch.manual_seed(1)
        model = randomize(model_cls(config_cls(**LM_SIZES, **extra))).eval()
        dirs[name] = (save_hf(model, tmp_path_factory.mktemp(name)), model)
    return dirs


def load_lm(path):
    with torch.device("meta"):
        lm = LM(hf.lm_config(hf.read_config(path), path))
    lm.to_empty(device="cpu")
    lm.init_weights()
    hf.load_lm(lm, path)
    return lm.eval()


def load_tower(path, select_layer):
    cfg = hf.vision_config(hf.read_config(path), select_layer, path)
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower.to_empty(device="cpu")
    hf.load_vision(tower, path)
    return tower.eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("full", [False, True])
def test_vision_tower_matches_transformers(tmp_path, family, full):
    torch.manual_seed(0)
    if family == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=VIT, text_config=dict(VIT, num_hidden_layers=1))) if full \
            else tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT))
    else:
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=VIT, text_config=dict(VIT, num_hidden_layers=1))) \
            if full else tf.SiglipVisionModel(tf.SiglipVisionConfig(**VIT))
    model = randomize(model).eval()
    path = save_hf(model, tmp_path)
    reference = model.vision_model if full else model
    frames = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = reference(pixel_values=frames, output_hidden_states=True)
    for select_layer in (-2, -1, 1):
        tower = load_tower(path, select_layer)
        expected = out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]
        if family == "clip":
            expected = expected[:, 1:]  # LLaVA's select_feature="patch": class token dropped
        with torch.no_grad():
            torch.testing.assert_close(tower(frames), expected, atol=1e-5, rtol=0)
    assert len(load_tower(path, -2).layers) == 2  # the last block is neither built nor loaded


@pytest.mark.parametrize("name", list(LM_CASES))
def test_lm_logits_match_transformers_right_padded(lm_dirs, name):
    path, reference = lm_dirs[name]
    lm = load_lm(path)
    T = 40 if name == "phi3_longrope" else 12  # past original_max_position_embeddings: long factors
    input_ids = torch.randint(3, 128, (2, T))
    attention_mask = torch.ones(2, T, dtype=torch.long)
    attention_mask[1, T - 4:] = 0  # row 1 is right-padded
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        document_ids = torch.where(attention_mask.bool(), 0, -1)  # padding: a document of its own
        logits = lm.logits(lm(lm.embed(input_ids), document_ids=document_ids))
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=0)
    if name == "phi3_longrope":  # and the short factors below the original length
        with torch.no_grad():
            short = input_ids[:, :10]
            torch.testing.assert_close(lm.logits(lm(lm.embed(short))), reference(input_ids=short).logits,
                                       atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(lm_dirs, tmp_path):
    _, reference = lm_dirs["llama"]
    path = save_hf(reference, tmp_path, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    lm = load_lm(path)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(lm(lm.embed(ids))), reference(input_ids=ids).logits, atol=1e-4, rtol=0)


def edited_copy(src, dst, edit):
    os.makedirs(dst)
    os.link(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_or_extra_tensor_is_an_error_naming_it(lm_dirs, tmp_path):
    path, _ = lm_dirs["llama"]
    missing = edited_copy(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(KeyError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_lm(missing)
    extra = edited_copy(path, tmp_path / "extra", lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(KeyError, match=r"unexpected tensor model\.layers\.0\.extra\.weight"):
        load_lm(extra)
    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:-1]
    with pytest.raises(ValueError, match=r"norm\.weight \(48,\) is not tiled exactly by model\.norm\.weight \(47,\)"):
        load_lm(edited_copy(path, tmp_path / "shape", shrink))


def test_unsupported_architecture_lists_supported(tmp_path):
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; nanovlm loads LlamaForCausalLM"):
        hf.lm_config(hf.read_config(tmp_path), str(tmp_path))


def test_packed_row_equals_samples_alone(lm_dirs):
    lm = load_lm(lm_dirs["qwen2_tied"][0])
    samples = [torch.randint(0, 128, (n,)) for n in (5, 9, 4)]
    row = torch.cat(samples)[None]
    document_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(samples)])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = lm.logits(lm(lm.embed(row), position_ids, document_ids))[0]
        alone = torch.cat([lm.logits(lm(lm.embed(s[None])))[0] for s in samples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(-1, -1), enable_gqa=False,
                     is_causal=None):
    """What a varlen kernel computes (flash_attn_varlen_func's and torch's signatures): causal SDPA per segment."""
    assert max_q >= int(torch.diff(cu_q).max())
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = end - start
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window_size[0] >= 0:
            allowed &= torch.arange(n)[:, None] - torch.arange(n)[None] <= window_size[0]
        s = lambda t: t[start:end].transpose(0, 1)  # (heads, n, hd)
        out[start:end] = F.scaled_dot_product_attention(s(q), s(k), s(v), attn_mask=allowed,
                                                        enable_gqa=True).transpose(0, 1)
    return out


@pytest.mark.parametrize("kernel", ["flash_attn", "torch"])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_path_equals_masked_sdpa(monkeypatch, kernel, window):
    """The CUDA varlen branch of attention(), run on CPU with a reference kernel of the same signature (the GPU
    check `python -m nanovlm.check --device cuda` compares the real kernels): segments follow documents and rows,
    GQA and the sliding window as SDPA with the explicit mask has them."""
    import nanovlm.lm as lm_module
    document_ids = torch.tensor([[0, 0, 1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 1, 1, 1]])
    meta = attention_meta(document_ids, 8, window, varlen=True)
    assert meta.cu_seqlens.tolist() == [0, 2, 7, 8, 13, 16] and meta.mask is None
    if kernel == "flash_attn":
        monkeypatch.setattr(lm_module, "flash_attn_varlen_func", varlen_reference)
    else:
        monkeypatch.setattr(lm_module, "flash_attn_varlen_func", None)
        monkeypatch.setattr(lm_module, "torch_varlen_attn", varlen_reference)
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)  # 4 heads, 2 KV heads
    masked = lm_module.attention(q, k, v, attention_meta(document_ids, 8, window, varlen=False), window)
    real = document_ids >= 0
    torch.testing.assert_close(lm_module.attention(q, k, v, meta, window)[real], masked[real], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory, lm_dirs):
    torch.manual_seed(2)
    vision = randomize(tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT)))
    return save_hf(vision, tmp_path_factory.mktemp("clip")), lm_dirs["llama"][0]


def test_vlm_matches_transformers_llava(vlm_dirs):
    vision_path, lm_path = vlm_dirs
    model = from_pretrained(vision_path, lm_path, projector="mlp2x_gelu", select_layer=-2).eval()
    with torch.no_grad():
        for p in model.projector.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    image_token = 127
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VIT), text_config=hf.read_config(lm_path),
                            image_token_id=image_token, vision_feature_layer=-2,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.text_config = tf.LlamaConfig(**{k: v for k, v in hf.read_config(lm_path).items()
                                           if k not in ("architectures", "transformers_version")})
    llava = tf.LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(tf.CLIPVisionModel.from_pretrained(vision_path).state_dict())
    llava.model.language_model.load_state_dict(tf.LlamaForCausalLM.from_pretrained(lm_path).model.state_dict())
    llava.lm_head.load_state_dict(tf.LlamaForCausalLM.from_pretrained(lm_path).lm_head.state_dict())
    proj = llava.model.multi_modal_projector
    with torch.no_grad():
        for ours, theirs in ((model.projector[0], proj.linear_1), (model.projector[2], proj.linear_2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    n = model.cfg.tokens_per_frame
    text = torch.randint(3, 120, (2, 6))
    ids = torch.cat([text[:, :2], torch.full((2, n), VISUAL_TOKEN), text[:, 2:]], dim=1)
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, frames)
        theirs = llava(input_ids=ids.masked_fill(ids == VISUAL_TOKEN, image_token), pixel_values=frames).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_pooled_video_tokens_in_time_order(vlm_dirs):
    model = from_pretrained(*vlm_dirs, pool_stride=2).eval()
    assert model.cfg.tokens_per_frame == 4  # grid 4x4 pooled by 2
    frames = torch.randn(3, 3, 32, 32)  # one video of 3 frames
    with torch.no_grad():
        tokens = model.encode_frames(frames)
        features = model.vision(frames).view(3, 4, 4, -1)
        pooled = features.view(3, 2, 2, 2, 2, -1).mean(dim=(2, 4)).reshape(3, 4, -1)  # 2x2 windows
        torch.testing.assert_close(tokens, model.projector(pooled), atol=1e-5, rtol=0)
        ids = torch.tensor([[5] + [VISUAL_TOKEN] * 12 + [6]])
        embedded = model.embed(ids, frames)
        torch.testing.assert_close(embedded[0, 1:13], tokens.flatten(0, 1))


def test_loss_is_summed_over_supervised_tokens(vlm_dirs):
    model = from_pretrained(*vlm_dirs).eval()
    ids = torch.randint(0, 128, (2, 7))
    targets = torch.full((2, 7), -100)
    targets[0, 3:6] = ids[0, 4:7]
    targets[1, 5] = ids[1, 6]
    with torch.no_grad():
        loss, count = model(ids, targets=targets)
        logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100], reduction="sum")
    assert count.item() == 4
    torch.testing.assert_close(loss, expected)


def test_greedy_generation_matches_transformers(lm_dirs, vlm_dirs):
    for name in ("llama", "phi3_longrope"):
        path, reference = lm_dirs[name]
        model = from_pretrained(vlm_dirs[0], path).eval()
        prompt = torch.randint(3, 128, (6,))
        expected = reference.generate(prompt[None], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                      pad_token_id=0)[0, 6:].tolist()
        assert model.generate([prompt], max_new_tokens=20)[0] == expected


def test_batched_generation_with_left_padding_equals_one_by_one(vlm_dirs):
    model = from_pretrained(*vlm_dirs).eval()
    n = model.cfg.tokens_per_frame
    prompts = [torch.tensor([4, 5] + [VISUAL_TOKEN] * n + [9]), torch.tensor([7, 8, 9, 10, 11] + [VISUAL_TOKEN] * n)]
    frames = torch.randn(2, 3, 32, 32)
    together = model.generate(prompts, frames, max_new_tokens=8)
    alone = [model.generate([p], frames[i:i + 1], max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert together == alone and len(together[0]) == 8


def test_sampling_top_p_and_eos():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5]] * 4)
    assert sample(logits, 1.0, 0.5).tolist() == [1, 1, 1, 1]  # the top token alone holds > 50%
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample(logits, 5.0, 1.0, g) for _ in range(50)])
    assert len(drawn.unique()) > 1


