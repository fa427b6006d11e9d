"""Several datasets in one run, images + videos + text in one packed row, several media per sample, record layouts,
validation sets with unreadable media (nanovlm/data.py, nanovlm/records.py, train.py). CPU, tiny fixtures."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_data import CHATML, MEAN, SIZE, STD, decoded_frame_numbers, make_tokenizer
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder

import train
from conftest import run_args
from nanovlm.data import Mixture, TrainBatches, VLMDataset, collate, draw_order, plan_rows
from nanovlm.media import frame_indices
from nanovlm.model import VISUAL_TOKEN, from_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASK, ANSWER = {"from": "human", "value": "What is happening?"}, {"from": "gpt", "value": "Pushing something"}


def write_video(path, num_frames):
    """10 fps; frame k a flat grey of level 10 + 14k (decoded_frame_numbers), so times x 10 fall inside frames."""
    levels = 10 + 14 * torch.arange(num_frames, dtype=torch.uint8)
    VideoEncoder(levels.view(-1, 1, 1, 1).expand(num_frames, 3, SIZE, SIZE).contiguous(), frame_rate=10).to_file(
        str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    vision, media = root / "vision", root / "media"
    vision.mkdir()
    media.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "image_size": SIZE}))
    (vision / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD,
                                                                 "crop_size": SIZE}))
    for name, frames in (("a.webm", 13), ("b.webm", 9), ("c.webm", 17)):  # 1.3 s, 0.9 s, 1.7 s
        write_video(media / name, num_frames=frames)
    Image.new("RGB", (20, 30), (200, 30, 30)).save(media / "red.png")
    return {"root": root, "vision": str(vision), "media": str(media)}


def asked(value, answer="Pushing something"):
    return [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]


def write(files, name, records):
    path = files["root"] / name
    path.write_text(json.dumps(records))
    return str(path)


def dataset(files, records, name="d.json", tokenizer=None, **kwargs):
    options = {"template": "vicuna_v1", "num_frames": 4, "tokens_per_frame": 2, "max_tokens": 256, **kwargs}
    return VLMDataset(write(files, name, records), files["media"], tokenizer or make_tokenizer("bytelevel"),
                      files["vision"], **options)


def test_mixture_draws_by_weight_resumes_exactly_and_ranks_agree(files):
    """Three datasets (video, image, text) of 30, 20 and 10 records with weights 0.5 / 0.3 / 0.2: an epoch of the
    plan draws them within 2 points of the weights; the batches resumed mid-epoch are bit for bit those of the
    uninterrupted run; 2 ranks x 1 row get exactly the rows of 1 rank x 2 rows."""
    videos = dataset(files, [{"id": f"v{k}", "video": "abc"[k % 3] + ".webm", "conversations": asked("<video>")}
                             for k in range(30)], "videos.json", fps=4.0, max_frames=5)
    images = dataset(files, [{"id": f"i{k}", "image": "red.png", "conversations": asked("<image> What?")}
                             for k in range(20)], "images.json")
    texts = dataset(files, [{"id": f"t{k}", "conversations": asked(f"Count to {k}.")} for k in range(10)], "t.json")
    assert sorted(set(videos.frame_counts)) == [4, 5]  # 1.3 s x 4 fps = 5, 0.9 s: 4, 1.7 s: 7, capped at 5
    mixture = Mixture([videos, images, texts], [0.5, 0.3, 0.2])
    for epoch in range(3):
        order = draw_order(mixture.sizes, mixture.weights, seed=4, epoch=epoch)
        rows = plan_rows(mixture.lengths, mixture.frame_counts, 256, 16, 4, epoch, sizes=mixture.sizes,
                         weights=mixture.weights)
        assert sorted(i for row in rows for i in row) == sorted(order)
        drawn = [sum(first <= i < first + n for i in order) / len(order) for first, n in zip(mixture.offsets,
                                                                                               mixture.sizes)]
        assert all(abs(f - w) <= 0.02 for f, w in zip(drawn, (0.5, 0.3, 0.2))), drawn
    # the text set (12 of 60 drawn, 10 records) repeats none before all were drawn: 10 distinct in epoch 0
    assert len({i for i in draw_order(mixture.sizes, mixture.weights, 4, 0) if i >= 50}) == 10

    def run(world, rank, start=(0, 0), steps=6):
        batches = TrainBatches(mixture, 2 // world, rank, world, 256, 16, True, seed=4, num_workers=0, start=start,
                               rows_per_step=2)
        return [(batches.position, next(batches)) for _ in range(steps)]

    one = run(1, 0)
    assert all((b["input_ids"] == VISUAL_TOKEN).sum() == 2 * len(b["frames"]) for _, b in one)
    resumed = run(1, 0, start=one[3][0], steps=3)  # where batch 3 starts, as a checkpoint after step 3 holds it
    for (position, batch), (again_position, again) in zip(one[3:], resumed):
        assert position == again_position and all(torch.equal(batch[k], again[k]) for k in ("input_ids", "frames"))
    ranks = [run(2, rank) for rank in (0, 1)]
    for step, (_, batch) in enumerate(one):
        halves = [ranks[rank][step][1] for rank in (0, 1)]
        width = batch["input_ids"].shape[1]
        for rank, half in enumerate(halves):
            row = torch.nn.functional.pad(half["input_ids"][0], (0, width - half["input_ids"].shape[1]))
            assert torch.equal(row, batch["input_ids"][rank])
        assert torch.equal(torch.cat([h["frames"] for h in halves]), batch["frames"])


def test_image_three_clips_and_text_in_one_packed_row_equal_the_three_alone(files, synthetic):
    """A packed row of an image sample, a sample of 3 clips (frames in placeholder order) and a text-only sample
    gives the logits of each alone, <= 1e-5."""
    model = from_pretrained(f"{synthetic}/vision", f"{synthetic}/lm", pool_stride=2, select_layer=-1).eval()
    tokenizer = make_tokenizer("bytelevel")
    records = [{"id": "image", "image": "red.png", "conversations": asked("Look: <image>")},
               {"id": "clips", "video": ["c.webm", "a.webm", "b.webm"],
                "conversations": asked("First <video>, then <video>, and <video>?")},
               {"id": "text", "conversations": asked("Just words here.", "Words back.")}]
    data = VLMDataset(write(files, "packed.json", records), files["media"], tokenizer, f"{synthetic}/vision", "plain",
                      3, model.cfg.tokens_per_frame, 512, train=False)
    assert data.frame_counts == [1, 9, 0] and data.media_frames[1] == [3, 3, 3]
    samples = [data[(0, 0, i)] for i in range(3)]
    clips = samples[1]["frames"].split(3)  # c (17 frames), a (13), b (9): centres of 3 segments of each, in order
    assert [decoded_frame_numbers(clip) for clip in clips] == [frame_indices(VideoDecoder(
        os.path.join(files["media"], name)).metadata.num_frames, 3) for name in ("c.webm", "a.webm", "b.webm")]
    packed = collate(samples, data.preprocess.size)
    with torch.no_grad():
        row = model(packed["input_ids"], packed["frames"], None, packed["position_ids"], packed["document_ids"])[0]
        start = 0
        for sample in samples:
            alone = collate([sample], data.preprocess.size)
            logits = model(alone["input_ids"], alone["frames"], None, alone["position_ids"], alone["document_ids"])[0]
            n = len(sample["input_ids"])
            torch.testing.assert_close(row[start:start + n], logits[:n], atol=1e-5, rtol=0)
            start += n


LAYOUTS = {  # name: (record in that layout, its LLaVA equivalent)
    "LLaVA-Video-178K (data_source folder, <image> for its video, multi-turn)": (
        {"id": "v", "data_source": "academic", "video": "clips/c.webm", "conversations": asked("<image>\nWhat?") + [
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It stops."}]},
        {"id": "v", "video": "academic/clips/c.webm", "conversations": asked("<video>\nWhat?") + [
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It stops."}]}),
    "LLaVA-OneVision single image": (
        {"id": "i", "image": "red.png", "conversations": asked("<image>\nDescribe.")},
        {"id": "i", "image": ["red.png"], "conversations": asked("<image>\nDescribe.")}),
    "LLaVA-OneVision multi-image": (
        {"id": "m", "image": ["red.png", "red.png"], "conversations": asked("<image>\n<image>\nSame?", "Yes.")},
        {"id": "m", "messages": [{"role": "user", "content": "<image>\n<image>\nSame?"},
                                 {"role": "assistant", "content": "Yes."}], "images": ["red.png", "red.png"]}),
    "ShareGPT messages, role/content strings": (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<video>\nWhat?"},
                      {"role": "assistant", "content": "Pushing something"}], "videos": ["a.webm"]},
        {"video": "a.webm", "conversations": [{"from": "system", "value": "Be brief."}] + asked("<video>\nWhat?")}),
    "transformers chat format, content parts": (
        {"messages": [{"role": "user", "content": [{"type": "video", "path": "a.webm"}, {"type": "text",
                                                                                         "text": "What?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Pushing something"}]}]},
        {"video": "a.webm", "conversations": asked("<video>\nWhat?")}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_record_layouts_give_the_tokens_and_labels_of_their_llava_equivalent(layout, files):
    tokenizer = make_tokenizer("bytelevel", CHATML)
    os.makedirs(os.path.join(files["media"], "academic", "clips"), exist_ok=True)
    write_video(os.path.join(files["media"], "academic", "clips", "c.webm"), num_frames=4)
    sets = [dataset(files, [record], f"layout{k}.json", tokenizer, template="chat") for k, record in
            enumerate(LAYOUTS[layout])]
    assert all(len(d) == 1 and d.num_skipped == 0 for d in sets)
    assert torch.equal(sets[0].ids, sets[1].ids) and torch.equal(sets[0].labels, sets[1].labels)
    assert sets[0].media(0) == sets[1].media(0) and sets[0].media(0)
    assert torch.equal(sets[0][0]["targets"], sets[1][0]["targets"])


def test_time_instruction_and_the_frame_budget_of_a_row(files, capsys):
    """fps sampling: frames follow each clip's duration (from the record, else probed); time_instruction says
    when they were taken; a sample whose clips cannot fit a row is skipped with the reason."""
    tokenizer = make_tokenizer("bytelevel", CHATML)
    records = [{"id": "timed", "video": ["c.webm", "a.webm"], "duration": [1.7, 1.3],
                "conversations": asked("<video> then <video>")},
               {"id": "probed", "video": "b.webm", "conversations": asked("<video>")},
               {"id": "too many", "video": ["c.webm"] * 3, "duration": [1.7] * 3,
                "conversations": asked("<video><video><video>")}]
    data = dataset(files, records, "timed.json", tokenizer, template="chat", fps=2.0, max_frames=8,
                   max_frames_per_row=8, time_instruction=True)
    assert data.media_frames == [[3, 3], [2]] and data.num_probed == 1 and data.num_skipped == 1
    prompt = tokenizer.decode([t for t in data.prompt(0)[0].tolist() if t != VISUAL_TOKEN])
    assert "The video lasts 1.70 seconds; 3 frames sampled at 0.28s, 0.85s, 1.42s." in prompt
    assert "The video lasts 1.30 seconds; 3 frames sampled at 0.22s, 0.65s, 1.08s." in prompt
    assert "record 2 (id='too many'): its 9 frames exceed max_frames_per_row=8" in capsys.readouterr().err
    assert decoded_frame_numbers(data[0]["frames"]) == [2, 8, 14, 2, 6, 10]  # centres in train mode: as the text says
    assert data.media_frames[1] == [2] and len(data[1]["frames"]) == 2  # 0.9 s x 2 fps, probed


def test_dataset_entry_typo_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "mix.py"
    config.write_text('datasets = [dict(name="a", train_data="x.json", media_root=".", wieght=0.5)]\n')
    with pytest.raises(SystemExit) as stopped:
        train.settings([str(config)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == ("config error: datasets[0] ('a'): unknown key 'wieght'; did you mean "
                                       "'weight'?\n")


def test_run_over_a_mixture_reports_each_validation_set(synthetic, files, tmp_path):
    """train.py over videos, images and text (weights 0.5 / 0.3 / 0.2, fps sampling for the videos): validation per
    dataset under its name; unreadable validation images and videos are warned about and counted; a validation set
    with nothing readable reports no loss, and says why."""
    media = files["media"]
    Image.new("RGB", (8, 8)).save(os.path.join(media, "ok.jpg"))
    with open(os.path.join(media, "ok.jpg"), "rb") as f:
        (tmp_path / "truncated.jpg").write_bytes(f.read()[:200])
    (tmp_path / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not really a webm")
    with open(f"{synthetic}/something-something-v2_train.json") as f:
        clips = json.load(f)
    bad = [{"id": "bad image", "image": str(tmp_path / "truncated.jpg"), "conversations": asked("<image>")},
           {"id": "bad clip", "video": str(tmp_path / "broken.webm"), "conversations": asked("<video>")}]
    images = [{"id": f"i{k}", "image": "red.png", "conversations": asked("<image>", "Red.")} for k in range(12)]
    texts = [{"id": f"t{k}", "conversations": asked(f"Count to {k}.", " ".join(map(str, range(k + 1))))}
             for k in range(8)]
    sets = {"clips": (clips[:24], clips[24:26] + bad, f"{synthetic}/20bn-something-something-v2"),
            "images": (images, images[:2] + bad[:1], media), "text": (texts, bad, media)}
    entries = []
    for (name, (training, validation, root)), weight in zip(sets.items(), (0.5, 0.3, 0.2)):
        entries.append(dict(name=name, train_data=write(files, f"{name}_train.json", training), weight=weight,
                            val_data=write(files, f"{name}_val.json", validation), media_root=root))
    entries[0].update(fps=2.0, max_frames=3)
    (tmp_path / "mix.py").write_text(f"datasets = {entries!r}\n")
    args = run_args(synthetic, tmp_path / "out", max_steps=2, eval_interval=2, eval_samples=0, max_tokens=128)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), str(tmp_path / "mix.py"), *args],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "log.jsonl") as f:
        [evaluation] = [m for m in map(json.loads, f) if any(k.endswith("val_samples") for k in m)]
    assert {k: evaluation[k] for k in evaluation if k.endswith(("val_samples", "val_skipped"))} == {
        "clips/val_samples": 2, "clips/val_skipped": 2, "images/val_samples": 2, "images/val_skipped": 1,
        "text/val_samples": 0, "text/val_skipped": 2}
    assert "clips/val_loss" in evaluation and "images/val_loss" in evaluation and "text/val_loss" not in evaluation
    err = result.stderr
    assert all(f"cannot read {tmp_path / name}" in err for name in ("truncated.jpg", "broken.webm"))
    assert "warning: 2 unreadable samples of validation set 'clips' skipped" in err
    assert "warning: no readable sample in validation set 'text' (2 unreadable): no validation metrics" in err
    assert "step 2: clips/val loss" in result.stdout and "step 2: text/val loss" not in result.stdout
