"""Tests for the data pipeline (nanovlm/data.py, nanovlm/media.py). CPU, tiny fixtures in tmp dirs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder
from transformers import PreTrainedTokenizerFast

from nanovlm.data import (IGNORE, BadSampleMonitor, RowSampler, TrainBatches, VLMDataset, collate, encode,
                          eval_batches, make_loader, normalize_answer, plan_rows, seeded_generator, validate_record)
from nanovlm.media import frame_indices, load_image, load_preprocess
from nanovlm.model import VISUAL_TOKEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIZE, NUM_VIDEO_FRAMES = 32, 16
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PHI3 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
        "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
        "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.", "USER: ASSISTANT: system",
          "What is happening in this video? Pushing something from left to right. A red circle moves up."]
TWO_TURNS = [{"from": "human", "value": "<video>\nWhat is happening?"},
             {"from": "gpt", "value": "Pushing something from left to right"},
             {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "A red circle moves up."}]


def make_tokenizer(kind, chat_template=None):
    """A tiny byte-level BPE (GPT-2/Qwen style) or Metaspace BPE that adds <s> (Llama style)."""
    if kind == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk = Tokenizer(models.BPE(byte_fallback=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        alphabet = []
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)] if kind == "metaspace" else []
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=SPECIAL + byte_tokens,
                                  initial_alphabet=alphabet)
    tk.train_from_iterator(CORPUS, trainer)
    if kind == "metaspace":
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def supervised_runs(ids, labels, tokenizer):
    """Decoded text of each contiguous run of supervised positions."""
    runs, run = [], []
    for token, label in zip(ids + [0], labels + [IGNORE]):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def write_video(path, num_frames=NUM_VIDEO_FRAMES, size=SIZE):
    """Frame k is a flat grey of level 10 + 14k, so the decoded pixels tell which frame was sampled."""
    levels = 10 + 14 * torch.arange(num_frames, dtype=torch.uint8)
    frames = levels.view(-1, 1, 1, 1).expand(num_frames, 3, size, size).contiguous()
    VideoEncoder(frames, frame_rate=12).to_file(str(path))


def decoded_frame_numbers(frames):
    """Invert write_video's grey levels from uint8 (F, 3, S, S) frames."""
    return ((frames[:, 0].float().mean((1, 2)) - 10) / 14).round().long().tolist()


def normalised(frames):
    """uint8 frames as the model normalises them (VLM.encode_frames), for comparisons in normalised units."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (frames.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    vision = root / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": SIZE,
                                                    "patch_size": 8}))
    (vision / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": MEAN, "image_std": STD, "crop_size": {"height": SIZE, "width": SIZE},
         "size": {"shortest_edge": SIZE}}))
    media = root / "media"
    media.mkdir()
    for name in ("a.webm", "b.webm", "c.webm"):
        write_video(media / name)
    write_video(media / "long.webm", num_frames=48, size=64)
    data = (media / "long.webm").read_bytes()
    (media / "truncated.webm").write_bytes(data[:len(data) // 2])
    (media / "empty.webm").write_bytes(b"")
    (media / "random.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    (media / "text.webm").write_text("not a video")
    Image.new("L", (20, 30), 128).save(media / "gray.png")
    return {"root": root, "vision": str(vision), "media": str(media)}


def video_record(name, question="<video>\nWhat is happening?", answer="Pushing something from left to right"):
    return {"id": name, "video": name, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


def make_dataset(files, records, name="train.json", template="vicuna_v1", tokenizer=None, **kwargs):
    path = files["root"] / name
    path.write_text(json.dumps(records))
    options = {"num_frames": 4, "tokens_per_frame": 2, "max_tokens": 256, **kwargs}
    return VLMDataset(str(path), files["media"], tokenizer or make_tokenizer("bytelevel"), files["vision"],
                        template, **options)


# -----------------------------------------------------------------------------
# conversations -> tokens

@pytest.mark.parametrize("kind,template,chat_template,expected", [
    ("bytelevel", "chat", CHATML, ["Pushing something from left to right<|im_end|>", "A red circle moves up.<|im_end|>"]),
    ("bytelevel", "chat", PHI3, ["Pushing something from left to right<|end|>", "A red circle moves up.<|end|>"]),
    ("bytelevel", "vicuna_v1", None, [" Pushing something from left to right</s>", " A red circle moves up.</s>"]),
    ("metaspace", "vicuna_v1", None, ["Pushing something from left to right</s>", "A red circle moves up.</s>"]),
    ("bytelevel", "plain", None, ["Pushing something from left to right</s>"]),
    ("metaspace", "plain", None, ["Pushing something from left to right</s>"]),
])
def test_supervised_tokens_decode_to_the_answers(kind, template, chat_template, expected):
    tokenizer = make_tokenizer(kind, chat_template)
    conversation = TWO_TURNS[:2] if template == "plain" else TWO_TURNS
    ids, labels = encode(conversation, tokenizer, template)
    assert supervised_runs(ids, labels, tokenizer) == expected
    assert ids.count(VISUAL_TOKEN) == 1
    # BOS where the tokenizer adds it (metaspace, Llama style); plain always starts with one: no sequence may begin
    # with visual tokens, which a pretrained LM would make its attention sinks (records.leading_bos)
    assert (ids[0] == tokenizer.bos_token_id) == (template == "plain" or kind == "metaspace" and template != "chat")
    # the generation prompt is exactly the training sequence up to where the last answer starts
    prompt, answer = encode(conversation, tokenizer, template, for_generation=True)
    assert prompt == ids[:len(prompt)] and labels[len(prompt)] != IGNORE and labels[len(prompt) - 1] == IGNORE
    assert answer == conversation[-1]["value"]


def test_chat_template_spans_with_system_turn():
    tokenizer = make_tokenizer("bytelevel", CHATML)
    conversation = [{"from": "system", "value": "Be brief."}] + TWO_TURNS
    ids, labels = encode(conversation, tokenizer, "chat")
    assert supervised_runs(ids, labels, tokenizer) == ["Pushing something from left to right<|im_end|>",
                                                       "A red circle moves up.<|im_end|>"]
    assert "Be brief." in tokenizer.decode([i for i in ids if i != VISUAL_TOKEN])


@pytest.mark.parametrize("record,reason", [
    ({"video": "a.webm", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "0 <video>"),
    ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]}, "no 'video'"),
    ({"video": "a", "conversations": [{"from": "gpt", "value": "<video>"}, {"from": "human", "value": "x"}]}, "expected human"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}, "is empty"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "end with a gpt turn"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "'from': str"),
    ({"conversations": "hello"}, "non-empty list"),
    ({"video": "a", "image": "b", "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]},
     "has 1 'image' path but 0 <image> placeholders"),
    ({"video": ["a", 3], "conversations": []}, "'video' must be a non-empty path string or a non-empty list of them"),
])
def test_validate_record_rejects(record, reason):
    assert reason in validate_record(record)


def test_validate_record_accepts_user_assistant_and_system():
    record = {"image": "x.png", "conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "<image>"},
                                                  {"from": "assistant", "value": "a"}]}
    assert validate_record(record) is None


# -----------------------------------------------------------------------------
# pixels

def test_load_preprocess_falls_back_to_config_and_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": {
        "model_type": "siglip_vision_model", "image_size": 48}}))
    pre = load_preprocess(str(tmp_path))
    assert (pre.size, pre.mean, pre.std) == (48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2", "image_size": 48}))
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_preprocess(str(tmp_path))


def test_frame_sampling_tsn_and_uniform(files):
    assert frame_indices(16, 4) == [2, 6, 10, 14]
    assert frame_indices(3, 4) == [0, 1, 1, 2]  # short clip: frames repeat, count kept
    draws = [frame_indices(16, 4, seeded_generator(0, epoch, 7)) for epoch in range(4)]
    assert all(4 * k <= index < 4 * k + 4 for draw in draws for k, index in enumerate(draw))
    assert len({tuple(d) for d in draws}) > 1  # epochs differ
    dataset = make_dataset(files, [video_record("a.webm"), video_record("b.webm")], seed=3)
    for epoch in (0, 1):
        frames = dataset.load_frames(1, epoch)
        assert frames.shape == (4, 3, SIZE, SIZE) and frames.dtype == torch.uint8
        claimed = VideoDecoder(os.path.join(files["media"], "b.webm"), seek_mode="approximate").metadata.num_frames
        assert claimed in (NUM_VIDEO_FRAMES - 1, NUM_VIDEO_FRAMES)  # the estimate from the duration can be 1 short
        expected = frame_indices(claimed, 4, seeded_generator(3, epoch, 1))
        assert decoded_frame_numbers(frames) == expected  # the sampled frames are the decoded ones
        assert torch.equal(dataset.load_frames(1, epoch), frames)  # reproducible by (seed, epoch, index)
    assert not torch.equal(dataset.load_frames(1, 0), dataset.load_frames(1, 1))
    evaluation = make_dataset(files, [video_record("a.webm")], name="eval.json", train=False)
    assert decoded_frame_numbers(evaluation.load_frames(0, epoch=5)) == frame_indices(claimed, 4)  # centres


def test_video_frames_resized_as_uint8(files):
    frames = make_dataset(files, [video_record("long.webm")], train=False).load_frames(0)
    assert frames.shape == (4, 3, SIZE, SIZE) and frames.dtype == torch.uint8  # 64x64 resized whole to 32x32
    level = (10 + 14 * torch.tensor(frame_indices(48, 4))) % 256  # grey levels of the sampled frames
    torch.testing.assert_close(frames[:, 1].float().mean((1, 2)), level.float(), atol=3.5, rtol=0)


def test_images_modes_orientation_and_padding(files, tmp_path):
    pre = load_preprocess(files["vision"])
    mean_colour = torch.tensor([(round(255 * m) / 255 - m) / s for m, s in zip(MEAN, STD)])
    red = torch.tensor([(1 - m) / s if c == 0 else (0 - m) / s for c, (m, s) in enumerate(zip(MEAN, STD))])
    # EXIF orientation 6 (rotate 90 clockwise to display): a wide left-red/right-blue picture becomes
    # a tall top-red/bottom-blue one, padded left and right with the mean colour
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    frame = normalised(load_image(tmp_path / "rotated.jpg", pre))[0]  # (3, 32, 32)
    assert frame.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(frame[:, 4, 16], red, atol=0.15, rtol=0)
    assert frame[2, 28, 16] > 1.5 and frame[0, 28, 16] < -1.5  # bottom is blue
    torch.testing.assert_close(frame[:, 16, 1], mean_colour, atol=0.05, rtol=0)  # padding
    # RGBA: transparent pixels take the mean colour; CMYK, 16-bit grey, palette all become RGB
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    clear = normalised(load_image(tmp_path / "clear.png", pre))[0, :, 16, 16]
    torch.testing.assert_close(clear, mean_colour, atol=0.05, rtol=0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = normalised(load_image(tmp_path / "cmyk.jpg", pre))[0, :, 16, 16]
    torch.testing.assert_close(cmyk, red, atol=0.15, rtol=0)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    white = normalised(load_image(tmp_path / "grey16.png", pre))[0, :, 16, 16]
    torch.testing.assert_close(white, torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]), atol=0.02, rtol=0)
    Image.new("P", (8, 8), 0).save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png", pre).shape == (1, 3, SIZE, SIZE)


def test_decompression_bomb_is_a_bad_sample(files, monkeypatch):
    dataset = make_dataset(files, [{"id": "g", "image": "gray.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "grey"}]}])
    assert dataset[0]["frames"].shape == (1, 3, SIZE, SIZE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20x30 = 600 pixels > 2x the limit: an error
    assert dataset[0] is None


# -----------------------------------------------------------------------------
# samples, packing, batches

def test_sample_targets_are_shifted_labels(files):
    tokenizer = make_tokenizer("bytelevel", CHATML)
    dataset = make_dataset(files, [{"id": "2", "video": "a.webm", "conversations": TWO_TURNS}], template="chat",
                           tokenizer=tokenizer)
    sample = dataset[0]
    ids, targets = sample["input_ids"], sample["targets"]
    assert (ids == VISUAL_TOKEN).sum() == 4 * 2 and len(ids) == dataset.lengths[0]
    assert targets[-1] == IGNORE and not (targets[(ids == VISUAL_TOKEN).nonzero()[:, 0] - 1] != IGNORE).any()
    supervised = (targets != IGNORE).nonzero()[:, 0]
    assert torch.equal(targets[supervised], ids[supervised + 1])
    assert tokenizer.decode(ids[supervised + 1]) == ("Pushing something from left to right<|im_end|>"
                                                     "A red circle moves up.<|im_end|>")


def test_truncation_keeps_visual_tokens_and_skips_visual_only_overflow(files):
    long_answer = " ".join(["Pushing something from left to right"] * 20)
    records = [video_record("a.webm", answer=long_answer), video_record("b.webm")]
    dataset = make_dataset(files, records, max_tokens=40, tokens_per_frame=8)  # 4 frames x 8 = 32 visual
    sample = dataset[0]
    assert len(sample["input_ids"]) == 40 == dataset.lengths[0]
    assert (sample["input_ids"] == VISUAL_TOKEN).sum() == 32
    assert sample["targets"][-1] == IGNORE
    overflow = make_dataset(files, records + [{"id": "t", "conversations": TWO_TURNS[2:]}], max_tokens=30,
                            tokens_per_frame=8)  # 32 visual > 30: both videos skipped, text kept
    assert len(overflow) == 1 and overflow.num_skipped == 2


def test_plan_rows_packs_within_budget_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (200,), generator=generator).tolist()
    frames = torch.randint(0, 5, (200,), generator=generator).tolist()
    rows = plan_rows(lengths, frames, max_tokens=128, max_frames_per_row=8, seed=1, epoch=0)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 and sum(frames[i] for i in row) <= 8 for row in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.8  # first-fit over a window fills rows well
    assert rows == plan_rows(lengths, frames, 128, 8, seed=1, epoch=0)
    assert rows != plan_rows(lengths, frames, 128, 8, seed=1, epoch=1)
    single = plan_rows(lengths, frames, 128, 8, seed=1, epoch=0, packing=False)
    assert all(len(row) == 1 for row in single) and len(single) == 200
    with pytest.raises(ValueError, match="max_frames_per_row"):
        plan_rows(lengths, frames, 128, max_frames_per_row=3, seed=1, epoch=0)


def test_collate_positions_documents_and_frames():
    def sample(n, num_frames, row, marker):
        ids = torch.arange(n) + 100 * marker
        return {"input_ids": ids, "targets": ids + 1, "frames": torch.full((num_frames, 3, 4, 4), float(marker)),
                "index": marker, "row": row}
    batch = collate([sample(3, 2, 0, 1), sample(4, 0, 0, 2), None, sample(5, 1, 1, 3)], image_size=4, pad_id=0,
                    pad_to_multiple=8)
    assert batch["input_ids"].shape == (2, 8) and (batch["num_skipped"], batch["num_samples"]) == (1, 3)
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    assert batch["targets"][0, 7] == IGNORE and batch["input_ids"][1, 5:].eq(0).all()
    assert batch["frames"][:, 0, 0, 0].tolist() == [1, 1, 3]  # placeholder order, row-major
    empty = collate([None], image_size=4)
    assert empty["frames"].shape == (0, 3, 4, 4) and empty["document_ids"].eq(-1).all()


def test_distributed_slices_and_resume(files):
    records = [video_record(n) for n in ("a.webm", "b.webm", "c.webm")] * 6
    dataset = make_dataset(files, records)
    def rows_of(batches):
        return [tuple(i for _, r, i in batch if r == row) for batch in batches for row in range(2)]
    one = RowSampler(dataset, micro_batch=2, max_frames_per_row=8, seed=5)
    one.set_epoch(2)
    expected = list(one)
    ranks = []
    for rank in (0, 1):
        sampler = RowSampler(dataset, micro_batch=1, max_frames_per_row=8, rank=rank, world_size=2, seed=5)
        sampler.set_epoch(2)
        ranks.append(list(sampler))
        assert len(sampler) == len(one)
    for step, batch in enumerate(expected):  # step k: rank 0 gets row 2k, rank 1 row 2k+1
        assert [key for key in batch if key[1] == 0] == ranks[0][step]
        assert [(e, 0, i) for e, r, i in batch if r == 1] == ranks[1][step]
    assert all(e == 2 for batch in expected for e, _, _ in batch)
    one.set_epoch(2, start_row=4)  # resume after 2 micro-steps of 2 rows
    assert list(one) == expected[2:]
    assert rows_of(expected) == [tuple(row) for row in one.rows()[:2 * len(expected)]]


def test_train_batches_resume_across_epochs(files):
    dataset = make_dataset(files, [video_record(n) for n in ("a.webm", "b.webm", "c.webm")] * 3)  # 9 rows
    def keys(batches, n):
        out = []
        for _ in range(n):
            batch = next(batches)
            out.append((batches.position, batch["input_ids"][:, :4].tolist(), batch["frames"].sum().item()))
        return out
    full = keys(TrainBatches(dataset, 2, 0, 1, 256, 8, False, seed=1, num_workers=0), 7)
    assert [p for p, _, _ in full] == [(0, 2), (0, 4), (0, 6), (0, 8), (1, 2), (1, 4), (1, 6)]  # row 9 dropped
    resumed = TrainBatches(dataset, 2, 0, 1, 256, 8, False, seed=1, num_workers=0, start=full[2][0])
    assert keys(resumed, 4) == full[3:]


def test_eval_batches_prompts_and_ranks(files):
    tokenizer = make_tokenizer("bytelevel", CHATML)
    records = [video_record(n, answer=f"answer {k}") for k, n in enumerate(["a.webm", "b.webm", "c.webm"] * 2)]
    dataset = make_dataset(files, records, template="chat", tokenizer=tokenizer, train=False)
    per_rank = [list(eval_batches(dataset, 2, rank, 2, max_samples=5)) for rank in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]  # every rank the same number of batches (the forwards are collective)
    answers = [[a for batch in batches for a in batch["answers"]] for batches in per_rank]
    assert answers == [["answer 0", "answer 2", "answer 4"], ["answer 1", "answer 3"]]  # every sample, once
    assert per_rank[1][1]["prompts"] == [] and per_rank[1][1]["frames"].shape[0] == 0  # rank 1's last: empty
    batch = per_rank[0][0]
    assert torch.equal(batch["prompt_frames"], batch["frames"]) and batch["frames"].shape[0] == 2 * 4
    for prompt, row in zip(batch["prompts"], batch["input_ids"]):
        assert torch.equal(prompt, row[:len(prompt)]) and (prompt == VISUAL_TOKEN).sum() == 8
        assert tokenizer.decode(prompt[-8:]).endswith("<|im_start|>assistant\n")
    assert normalize_answer(" Pushing [something] from left to right. ") == "pushing something from left to right"


def test_bad_media_skipped_and_counted_with_workers(files, capfd):
    names = ["a.webm", "empty.webm", "random.webm", "text.webm", "missing.webm", "truncated.webm", "b.webm"]
    records = [video_record(n) for n in names] + [{"id": "t", "conversations": TWO_TURNS[2:]}, {
        "id": "i", "image": "gray.png", "conversations": [{"from": "human", "value": "<image>"}, TWO_TURNS[1]]}]
    records.append({"id": "bad", "video": "c.webm", "conversations": [{"from": "gpt", "value": "x"}]})  # malformed
    dataset = make_dataset(files, records)
    assert len(dataset) == 9 and dataset.num_skipped == 1
    sampler = RowSampler(dataset, micro_batch=3, max_frames_per_row=8, packing=False)
    loader = make_loader(dataset, sampler, num_workers=2)
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 5 and sum(b["num_samples"] for b in batches) == 4
    assert sum(len(b["frames"]) for b in batches) == 2 * 4 + 1  # two clips and an image, mixed
    for batch in batches:
        assert (batch["input_ids"] == VISUAL_TOKEN).sum() == len(batch["frames"]) * 2
    warnings = capfd.readouterr().err.splitlines()
    assert "record 9" in warnings[0] and len(warnings) == 6  # the malformed record + each bad file once
    assert all(sum(n in line for line in warnings) == 1 for n in names[1:6])


def test_bad_fraction_stops_the_run(files):
    monitor = BadSampleMonitor(max_bad_fraction=0.05, min_samples=100)
    monitor.update(num_samples=56, num_skipped=4)  # 6.7% but fewer than 100 seen
    monitor.update(num_samples=39, num_skipped=1)  # 5 of 100: not more than 5%
    with pytest.raises(RuntimeError, match="6 of 110"):
        monitor.update(num_samples=9, num_skipped=1)
    records = [video_record("a.webm")] * 95 + [{"id": "x", "conversations": []}] * 5
    with pytest.raises(RuntimeError, match="5 of 100 records"):
        make_dataset(files, records, max_bad_fraction=0.01)


def test_json_that_is_not_a_list_of_records(files):
    path = files["root"] / "dict.json"
    path.write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="dict.json: expected a JSON list"):
        VLMDataset(str(path), files["media"], make_tokenizer("bytelevel"), files["vision"], "plain", 4, 2, 64)
    path.write_text(json.dumps([video_record("a.webm"), "oops"]))
    with pytest.raises(ValueError, match="dict.json record 1: expected an object"):
        VLMDataset(str(path), files["media"], make_tokenizer("bytelevel"), files["vision"], "plain", 4, 2, 64)


def test_workers_return_freed_frame_memory_to_the_os(tmp_path):
    """Frames of changing sizes, made and freed as a worker does: without return_freed_memory glibc keeps the freed
    memory (a demo worker reached 12 GB and was OOM-killed); with it the process stays flat."""
    script = tmp_path / "frag.py"
    script.write_text(
        "import sys, torch\n"
        "from nanovlm import data\n"
        "if sys.argv[1] == '1':\n"
        "    data.return_freed_memory()\n"
        "def rss():\n"
        "    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
        "g = torch.Generator().manual_seed(0)\n"
        "start, keep = rss(), []\n"
        "for step in range(300):\n"
        "    clips = [torch.empty(8, 3, 64, 64).fill_(1.0) for _ in range(int(torch.randint(20, 60, (1,), generator=g)))]\n"
        "    batch = torch.cat(clips)\n"
        "    keep.append(torch.ones(int(torch.randint(10, 2000, (1,), generator=g))))  # small things outlive a batch\n"
        "    del clips, batch\n"
        "print(rss() - start)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    # Without the call this grew by 819-851 MB in 3 of 4 runs here (glibc's layout varies: 55 MB in the fourth), so
    # only the fixed side is asserted (flat in every run here).
    growth = int(subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True, env=env,
                                check=True).stdout)
    assert growth < 50, growth  # MB over 300 batches


def test_a_record_the_chat_template_rejects_is_skipped_not_fatal(files, capsys):
    """A chat template can raise on one record (jinja's raise_exception, as Llama-2's and Mistral's templates do
    for roles they do not take): that record is skipped with the template's reason, the others are kept."""
    strict = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
                                                        "{{ raise_exception('no forbidden words') }}{% endif %}")
    records = [video_record("a.webm", answer="fine"), video_record("b.webm", answer="forbidden"),
               video_record("c.webm", answer="also fine")]
    dataset = make_dataset(files, records, template="chat", tokenizer=make_tokenizer("bytelevel", strict))
    assert len(dataset) == 2 and dataset.num_skipped == 1
    warning = capsys.readouterr().err
    assert "record 1 (id='b.webm')" in warning and "no forbidden words; skipped" in warning
