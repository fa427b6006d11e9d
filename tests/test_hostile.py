"""Hostile media and hostile records, each generated here, run through the real pipeline.

Media: every case is listed in one JSON and goes through VLMDataset + TrainBatches with 2 workers
for two epochs; each is either read (shape and pixel values checked) or skipped and counted, and
the workers survive it. Records: each malformed record is skipped with an exact reason by
VLMDataset and reported with the same reason by `prepare.py llava-pretrain`; a record that is not
an object, or a file that is not a JSON list, is a one-line error naming the file. CPU, tiny sizes,
no network.
"""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torchcodec.encoders import VideoEncoder
from transformers import PreTrainedTokenizerFast

import prepare
from nanovlm.data import BadSampleMonitor, TrainBatches, VLMDataset, plan_rows
from nanovlm.media import VisionPreprocess, load_image
from nanovlm.model import VISUAL_TOKEN

SIZE, NUM_FRAMES = 32, 8  # tower input side; frames asked per video
GREY = 128  # the padding / transparent colour: round(255 * mean) with mean 0.5


def make_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["What is happening? Pushing something from left to right. USER: ASSISTANT:"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_vision(root):
    """A tower dir with mean = std = 0.5, so a normalised value x is the pixel 127.5 * (x + 1)."""
    vision = root / "vision"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "image_size": SIZE}))
    return str(vision)


def write_video(path, num_frames, width=SIZE, height=SIZE):
    """Frame k is a flat grey of level 10 + 14k, so a decoded pixel tells which frame it is."""
    levels = 10 + 14 * torch.arange(num_frames, dtype=torch.uint8)
    VideoEncoder(levels.view(-1, 1, 1, 1).expand(num_frames, 3, height, width).contiguous(),
                 frame_rate=12).to_file(str(path))


def png_declaring(path, width, height):
    """A valid 8x8 PNG whose IHDR is patched to claim width x height (CRC fixed): only the header lies."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # signature (8) + chunk length (4) + b"IHDR" (4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # CRC of b"IHDR" + 13 data bytes
    path.write_bytes(bytes(png))


def pixels(frames):
    """uint8 (F, 3, S, S) frames -> float pixel values."""
    return frames.float()


def frame_numbers(frames):
    """Which source frame of write_video each decoded frame is."""
    return ((pixels(frames)[:, 0].mean((1, 2)) - 10) / 14).round().long().tolist()


def near(pixel, rgb, atol=12):
    return torch.allclose(pixel, torch.tensor(rgb, dtype=torch.float32), atol=atol)


# ---------------------------------------------------------------------------------------------------------------------
# media: name -> (media key, writer(path), check of the decoded frames, or None if the sample must be skipped)

def write_rotated(path):
    """EXIF orientation 6 (display rotated 90 degrees clockwise): stored wide left-red/right-blue,
    shown tall top-red/bottom-blue."""
    wide = Image.new("RGB", (64, 32), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(path, exif=exif, quality=95)


def write_rgba(path):
    image = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # right half: transparent blue
    image.paste((255, 0, 0, 255), (0, 0, 4, 8))  # left half: opaque red
    image.save(path)


def write_palette(path):
    image = Image.new("P", (8, 8), 1)
    image.paste(0, (0, 0, 4, 8))  # left half: index 0, declared transparent
    image.putpalette([0, 0, 0, 0, 200, 0])
    image.save(path, transparency=0)


def write_truncated(path):
    full = path.with_name("full.webm")
    write_video(full, 48, 64, 64)
    data = full.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_jpeg_bytes(path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, "JPEG")


def write_truncated_jpeg(path):
    write_jpeg_bytes(path)
    path.write_bytes(path.read_bytes()[:200])


def check_clip(frames):
    numbers = frame_numbers(frames)
    return numbers == sorted(numbers) and numbers[-1] - numbers[0] >= 10 and set(numbers) <= set(range(16))


def check_short(frames):
    """3 frames, 8 asked: they repeat in order, and every one of the 3 is used."""
    numbers = frame_numbers(frames)
    return numbers == sorted(numbers) and set(numbers) == {0, 1, 2}


def check_rotated(frames):
    """Top red, bottom blue, mean-colour bars left and right."""
    pixel = pixels(frames)[0]
    return (near(pixel[:, 4, 16], [255, 0, 0], atol=30) and near(pixel[:, 28, 16], [0, 0, 255], atol=30)
            and near(pixel[:, 16, 1], [GREY] * 3))


MEDIA = {
    "clip.webm": ("video", lambda p: write_video(p, 16), check_clip),
    "empty.webm": ("video", lambda p: p.write_bytes(b""), None),
    "truncated.webm": ("video", write_truncated, None),  # half of a 48-frame clip: < 90% of the claimed frames
    "random.webm": ("video", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), None),
    "text.webm": ("video", lambda p: p.write_text("<html>not a video</html>"), None),
    "missing.webm": ("video", lambda p: None, None),
    "a directory.webm": ("video", lambda p: p.mkdir(), None),
    "one frame.webm": ("video", lambda p: write_video(p, 1), lambda f: frame_numbers(f) == [0] * NUM_FRAMES),
    "three frames.webm": ("video", lambda p: write_video(p, 3), check_short),
    "vidéo clip 1.webm": ("video", lambda p: write_video(p, 16, 40, 24), check_clip),  # wide: resized whole
    "image listed as video.png": ("video", lambda p: Image.new("RGB", (8, 8)).save(p, "PNG"), None),
    "huge header.png": ("image", lambda p: png_declaring(p, 20000, 20000), None),  # over 2x Pillow's limit
    "bomb header.png": ("image", lambda p: png_declaring(p, 10000, 9500), None),  # over the limit, under 2x
    "truncated.jpg": ("image", write_truncated_jpeg, None),
    "clip listed as image.webm": ("image", lambda p: write_video(p, 4), None),
    "grey.png": ("image", lambda p: Image.new("L", (20, 30), 100).save(p),  # tall: padded left and right
                 lambda f: near(pixels(f)[0, :, 16, 16], [100] * 3) and near(pixels(f)[0, :, 16, 1], [GREY] * 3)),
    "cmyk.jpg": ("image", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p),
                 lambda f: near(pixels(f)[0, :, 16, 16], [255, 0, 0], atol=25)),
    "rgba.png": ("image", write_rgba,  # transparent pixels become the padding colour, not black
                 lambda f: near(pixels(f)[0, :, 16, 4], [255, 0, 0]) and near(pixels(f)[0, :, 16, 28], [GREY] * 3)),
    "grey16.png": ("image", lambda p: Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(p),
                   lambda f: near(pixels(f)[0, :, 16, 16], [128] * 3, atol=2)),  # 16-bit scaled, not clipped
    "palette.png": ("image", write_palette,
                    lambda f: near(pixels(f)[0, :, 16, 4], [GREY] * 3) and near(pixels(f)[0, :, 16, 28], [0, 200, 0])),
    "rotated.jpg": ("image", write_rotated, check_rotated),
    "jpeg bytes.png": ("image", write_jpeg_bytes, lambda f: near(pixels(f)[0, :, 16, 16], [255, 0, 0], atol=25)),
    "image ü 2.png": ("image", lambda p: Image.new("RGB", (8, 8), (0, 0, 255)).save(p),
                      lambda f: near(pixels(f)[0, :, 16, 16], [0, 0, 255])),
}
SKIPPED = sorted(name for name, (_, _, check) in MEDIA.items() if check is None)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    media = root / "media"
    media.mkdir()
    records = []
    for name, (key, write, _) in MEDIA.items():
        write(media / name)
        records.append({"id": name, key: name, "conversations": [
            {"from": "human", "value": f"<{key}>\nWhat is happening?"}, {"from": "gpt", "value": "Pushing"}]})
    (root / "hostile.json").write_text(json.dumps(records))
    return VLMDataset(str(root / "hostile.json"), str(media), make_tokenizer(), write_vision(root), "plain",
                      num_frames=NUM_FRAMES, tokens_per_frame=1, max_tokens=64, seed=1)


def test_hostile_media_read_or_skipped_and_counted(hostile, capfd):
    assert len(hostile) == len(MEDIA) and hostile.num_skipped == 0  # all records are well-formed
    batches = TrainBatches(hostile, micro_batch=1, rank=0, world_size=1, max_tokens=64, max_frames_per_row=NUM_FRAMES,
                           packing=False, seed=1, num_workers=2)
    monitor = BadSampleMonitor(max_bad_fraction=0.5, min_samples=2 * len(MEDIA))  # judges the 2 epochs: 11 of 23 bad
    for epoch in range(2):  # the second epoch reuses the (persistent) workers: none died on the first
        outcomes = {}
        for [i] in plan_rows(hostile.lengths, hostile.frame_counts, 64, NUM_FRAMES, seed=1, epoch=epoch, packing=False):
            batch = next(batches)  # row k of the epoch's plan: one sample, the i-th record
            name = hostile.records[i]["id"]
            monitor.update(batch["num_samples"], batch["num_skipped"])
            assert (batch["input_ids"] == VISUAL_TOKEN).sum() == len(batch["frames"])  # 1 token per frame
            if batch["num_skipped"]:
                assert (batch["num_samples"], len(batch["frames"])) == (0, 0), name
                outcomes[name] = "skipped"
                continue
            frames = batch["frames"]
            key, _, check = MEDIA[name]
            assert frames.shape == (NUM_FRAMES if key == "video" else 1, 3, SIZE, SIZE), name
            assert frames.dtype == torch.uint8, name  # normalised on the device, by the model
            assert check(frames), (name, frame_numbers(frames), pixels(frames)[:, :, 16, 16])
            outcomes[name] = "read"
        assert sorted(n for n, outcome in outcomes.items() if outcome == "skipped") == SKIPPED, epoch
        assert len(outcomes) == len(MEDIA) and batches.position == (epoch, len(MEDIA))
    assert (monitor.num_bad, monitor.num_seen) == (2 * len(SKIPPED), 2 * len(MEDIA))
    # each bad file is warned about on one line naming it (once per worker process that met it)
    warnings = capfd.readouterr().err.splitlines()
    assert all(line.startswith("warning: cannot read ") and line.endswith("; skipped") for line in warnings), warnings
    for name in SKIPPED:
        mine = [line for line in warnings if f"/{name} (record " in line]
        assert 1 <= len(mine) <= 2, (name, warnings)
        assert ("DecompressionBomb" in mine[0]) == ("header.png" in name), mine
    assert not any(f"/{name} (record " in line for line in warnings for name in MEDIA if name not in SKIPPED)


def test_bomb_under_twice_the_limit_fails_before_decoding(tmp_path):
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; load_image makes it an error at
    open, so no 10000x9500 canvas (285 MB, 1.6 GB peak through resize) is ever allocated."""
    png_declaring(tmp_path / "bomb.png", 10000, 9500)
    with pytest.raises(Image.DecompressionBombWarning, match="95000000 pixels"):
        load_image(tmp_path / "bomb.png", VisionPreprocess(SIZE, (0.5,) * 3, (0.5,) * 3))


def test_bad_sample_monitor_stops_a_run_on_hostile_media(hostile):
    batches = TrainBatches(hostile, micro_batch=2, rank=0, world_size=1, max_tokens=64,
                           max_frames_per_row=2 * NUM_FRAMES, packing=True, seed=1, num_workers=2)
    monitor = BadSampleMonitor(max_bad_fraction=0.2, min_samples=10)  # 11 of 23 files are bad
    bad = seen = 0
    message = None
    try:  # not pytest.raises: its traceback would keep the loader, and so its workers, alive until exit
        for _ in range(len(MEDIA)):  # more than enough micro-batches to cross 10 seen
            batch = next(batches)
            bad, seen = bad + batch["num_skipped"], seen + batch["num_skipped"] + batch["num_samples"]
            monitor.update(batch["num_samples"], batch["num_skipped"])
    except RuntimeError as error:
        message = str(error)
    assert seen >= 10 and bad > 0.2 * seen
    assert message == (f"{bad} of {seen} samples were bad, more than max_bad_fraction=0.2: "
                       "fix the data (see the warnings) or raise max_bad_fraction")


# ---------------------------------------------------------------------------------------------------------------------
# records: each is skipped with its reason by VLMDataset and reported with it by prepare.py llava-pretrain

def turn(sender, value):
    return {"from": sender, "value": value}


def video(*turns, **fields):
    return {"id": "bad", "video": "clip.webm", "conversations": list(turns), **fields}


ASK, ANSWER = turn("human", "<video>\nWhat is happening?"), turn("gpt", "Pushing something")
GOOD = [video(ASK, ANSWER, id="good video"),
        {"id": "good image", "image": "a.png", "conversations": [turn("human", "Describe.<image>"), ANSWER]},
        {"id": "good text", "conversations": [turn("system", "Be brief."), turn("human", "Hi?"), turn("gpt", "Hi.")]}]
ALTERNATE = "(turns alternate, starting with human)"
TURN_TYPES = "every turn of 'conversations' must be {'from': str, 'value': str}"
VIDEO_PATHS = "'video' must be a non-empty path string or a non-empty list of them"
HOSTILE_RECORDS = {  # case -> (record, the exact reason)
    "missing conversations": ({"id": "bad", "video": "clip.webm"}, "'conversations' must be a non-empty list"),
    "empty conversations": (video(), "'conversations' must be a non-empty list"),
    "conversations not a list": (video(conversations="<video> hi"), "'conversations' must be a non-empty list"),
    "placeholder missing": (video(turn("human", "What?"), ANSWER),
                            "has 1 'video' path but 0 <video>/<image> placeholders; expected 1"),
    "two placeholders in a turn": (video(turn("human", "<video> and <video>"), ANSWER),
                                   "has 1 'video' path but 2 <video>/<image> placeholders; expected 1"),
    "placeholders in two turns": (video(ASK, ANSWER, ASK, ANSWER),
                                  "has 1 'video' path but 2 <video>/<image> placeholders; expected 1"),
    "two images, one placeholder": ({"id": "bad", "image": ["a.png", "a.png"], "conversations": [
        turn("human", "<image> and?"), ANSWER]}, "has 2 'image' paths but 1 <video>/<image> placeholders; expected 2"),
    "placeholder without media": ({"id": "bad", "conversations": [ASK, ANSWER]},
                                  "has a <video>/<image> placeholder but no 'video' or 'image' key"),
    "placeholder in assistant": (video(turn("human", "Hi"), turn("gpt", "It shows <video>")),
                                 "conversations[1] (gpt) contains a <video>/<image> placeholder"),
    "placeholder in system": (video(turn("system", "<video>"), ASK, ANSWER),
                              "the system turn contains a <video>/<image> placeholder"),
    "empty assistant": (video(ASK, turn("gpt", "")), "conversations[1] (gpt) is empty"),
    "blank assistant": (video(ASK, turn("gpt", " \n\t")), "conversations[1] (gpt) is empty"),
    "two human turns": (video(ASK, turn("human", "And?"), ANSWER, ANSWER),
                        f"conversations[1] is from 'human', expected gpt {ALTERNATE}"),
    "starts with gpt": (video(ANSWER, ASK), f"conversations[0] is from 'gpt', expected human {ALTERNATE}"),
    "ends with human": (video(ASK, ANSWER, turn("human", "And?")),
                        "the conversation must alternate human/gpt turns and end with a gpt turn"),
    "unknown role": (video(ASK, turn("robot", "Beep")), f"conversations[1] is from 'robot', expected gpt {ALTERNATE}"),
    "system in the middle": (video(ASK, turn("system", "x")),
                             f"conversations[1] is from 'system', expected gpt {ALTERNATE}"),
    "value not a string": (video(ASK, turn("gpt", 3)), TURN_TYPES),
    "from not a string": (video(ASK, turn(None, "x")), TURN_TYPES),
    "value missing": (video(ASK, {"from": "gpt"}), TURN_TYPES),
    "turn not an object": (video(ASK, "Pushing"), TURN_TYPES),
    "video path not a string": (video(ASK, ANSWER, video={"path": "clip.webm"}), VIDEO_PATHS),
    "video path empty": (video(ASK, ANSWER, video=""), VIDEO_PATHS),
    "video list empty": (video(ASK, ANSWER, video=[]), VIDEO_PATHS),
    "video and image, no <image>": (video(ASK, ANSWER, image="a.png"),
                                    "has 1 'image' path but 0 <image> placeholders; expected 1"),
    "messages not role/content": ({"id": "bad", "messages": [{"role": "user", "text": "hi"}]},
                                  "every message of 'messages' must be {'role': str, 'content': str or a list of parts}"),
    "unknown content part": ({"id": "bad", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
                             "a content part of a 'user' message is {'type': 'audio'}; expected {'type': 'text', "
                             "'text': str} or {'type': 'image'/'video', 'path': str}"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def llava_root(tmp_path):
    """A LLaVA layout whose media exist, so a good record is kept and a bad one is bad for its own reason."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    write_video(images / "clip.webm", 2)
    return tmp_path


@pytest.mark.parametrize("case", HOSTILE_RECORDS)
def test_hostile_record_skipped_with_reason(case, tokenizer, llava_root, capsys):
    record, reason = HOSTILE_RECORDS[case]
    path = llava_root / "hostile.json"
    path.write_text(json.dumps([GOOD[0], record] + GOOD[1:]))  # the bad record is JSON index 1
    dataset = VLMDataset(str(path), str(llava_root / "images"), tokenizer, write_vision(llava_root), "vicuna_v1",
                         num_frames=2, tokens_per_frame=1, max_tokens=128)
    assert dataset.num_skipped == 1 and [r["id"] for r in dataset.records] == [r["id"] for r in GOOD]
    assert dataset.json_indices == [0, 2, 3]
    assert capsys.readouterr().err == f"warning: {path} record 1 (id='bad'): {reason}; skipped\n"
    prepare.main(["llava-pretrain", "--root", str(llava_root), "--json", "hostile.json", "--val", "0"])
    clean = json.loads((llava_root / "hostile.clean.json").read_text())  # as they came, the video's duration added
    assert [{k: v for k, v in r.items() if k != "duration"} for r in clean] == GOOD and clean[0]["duration"] > 0
    assert json.loads((llava_root / "hostile.report.json").read_text()) == [{"index": 1, "id": "bad", "reason": reason}]


@pytest.mark.parametrize("record", ["a string", ["a", "list"], None, 3])
def test_record_not_an_object(record, tokenizer, llava_root):
    """Not skipped by the dataset: a list holding non-objects is the wrong file, so it is an error
    naming the file and index. prepare.py reports it like any other bad record."""
    path = llava_root / "hostile.json"
    path.write_text(json.dumps([GOOD[0], record]))
    with pytest.raises(ValueError) as error:
        VLMDataset(str(path), str(llava_root / "images"), tokenizer, write_vision(llava_root), "plain", 2, 1, 64)
    assert str(error.value) == (f"{path} record 1: expected an object, got {type(record).__name__}; "
                                "the file must be a JSON list of LLaVA records")
    prepare.main(["llava-pretrain", "--root", str(llava_root), "--json", "hostile.json", "--val", "0"])
    report = json.loads((llava_root / "hostile.report.json").read_text())
    assert report == [{"index": 1, "id": None, "reason": "record is not a JSON object"}]


@pytest.mark.parametrize("content,dataset_error,prepare_error", [
    (json.dumps({"data": [GOOD[0]]}), "{path}: expected a JSON list of records, got a dict",
     "{path} must hold a JSON list of records, got dict"),
    (json.dumps("records"), "{path}: expected a JSON list of records, got a str",
     "{path} must hold a JSON list of records, got str"),
    (json.dumps([GOOD[0]])[:-5], "cannot read {path}: ", "{path} is not valid JSON: "),  # cut short
    ("", "cannot read {path}: ", "{path} is not valid JSON: "),
])
def test_bad_json_file_is_one_line_error_naming_it(content, dataset_error, prepare_error, tokenizer, llava_root):
    path = llava_root / "hostile.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        VLMDataset(str(path), str(llava_root / "images"), tokenizer, write_vision(llava_root), "plain", 2, 1, 64)
    assert str(error.value).startswith(dataset_error.format(path=path)) and "\n" not in str(error.value)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["llava-pretrain", "--root", str(llava_root), "--json", "hostile.json"])
    message = str(stopped.value.code)
    assert message.startswith("prepare.py: error: " + prepare_error.format(path=path)) and "\n" not in message
