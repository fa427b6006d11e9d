"""Tests for prepare.py: synthetic SSv2, real SSv2 layouts with corrupt videos, LLaVA JSON cleaning. CPU, offline."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torchcodec.decoders import VideoDecoder
from torchcodec.encoders import VideoEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare  # noqa: E402

LEFT_TO_RIGHT, RIGHT_TO_LEFT = "Pushing [something] from left to right", "Pushing [something] from right to left"


def run(*args):
    prepare.main([str(a) for a in args])


def read(path):
    return json.loads(Path(path).read_text())


def decode_all(path):
    decoder = VideoDecoder(str(path), seek_mode="exact")
    return decoder.get_frames_in_range(0, len(decoder)).data  # (T, 3, H, W) uint8


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two runs with the same seed (for the determinism test); 12 train clips cover all 7 classes."""
    outs = [tmp_path_factory.mktemp(f"synthetic{i}") for i in range(2)]
    for out in outs:
        run("synthetic", "--out", out, "--train", 12, "--val", 4, "--seed", 3, "--pretrain-steps", 2)
    return outs


def test_synthetic_official_layout(synthetic):
    out = synthetic[0]
    labels = read(out / "something-something-v2-labels.json")
    assert labels["Pushing something from left to right"] == "93" and len(labels) == len(prepare.SYNTH_CLASSES)
    train, val = read(out / "something-something-v2-train.json"), read(out / "something-something-v2-validation.json")
    assert len(train) == 12 and len(val) == 4
    assert {entry["template"] for entry in train} == {t for t, _ in prepare.SYNTH_CLASSES}  # every class present
    for entry in train + val:
        assert set(entry) == {"id", "label", "template", "placeholders"}
        assert prepare.strip_brackets(entry["template"]) in labels
        filled = entry["template"]
        for name in entry["placeholders"]:
            filled = filled.replace("[something]", name, 1)
        assert entry["label"] == filled[0].lower() + filled[1:]
        decoder = VideoDecoder(str(out / prepare.VIDEO_DIR / f"{entry['id']}.webm"), seek_mode="exact")
        assert decoder.metadata.average_fps == pytest.approx(12, abs=0.1)
        assert decoder.metadata.codec == "vp9" and decoder.metadata.width == prepare.FRAME_SIZE
        assert prepare.SECONDS[0] <= len(decoder) / 12 <= prepare.SECONDS[1]


def test_synthetic_converted_json(synthetic):
    out = synthetic[0]
    templates = {e["id"]: e["template"] for e in read(out / "something-something-v2-train.json")}
    records = read(out / "something-something-v2_train.json")
    assert len(records) == 12 and read(out / "probe_report.json") == []
    for record in records:
        assert prepare.validate_record(record) is None
        assert record["video"] == f"{record['id']}.webm"
        assert record["conversations"][0] == {"from": "human", "value": "Describe this video.\n<video>"}
        assert record["conversations"][1] == {"from": "gpt", "value": templates[record["id"]]}
    assert str((out / prepare.VIDEO_DIR).resolve()) in (out / "something-something-v2_README.md").read_text()


def test_synthetic_is_deterministic_by_seed(synthetic):
    first, second = synthetic
    for name in ("something-something-v2-train.json", "something-something-v2_val.json"):
        assert (first / name).read_text() == (second / name).read_text()
    for clip_id in ("1", "13"):
        video = Path(prepare.VIDEO_DIR) / f"{clip_id}.webm"
        assert torch.equal(decode_all(first / video), decode_all(second / video))


def shift(frames, colour):
    """Centroid (x, y) shift of the object of this colour from the first to the last frame. Only pixels that changed
    count, so static clutter of a similar colour does not pull the centroids together."""
    first, last = frames[0].float(), frames[-1].float()  # (3, H, W)
    changed = (last - first).abs().sum(dim=0) > 60
    target = torch.tensor(prepare.COLOURS[colour], dtype=torch.float32).view(3, 1, 1)

    def centroid(frame):
        ys, xs = (((frame - target).abs().sum(dim=0) < 90) & changed).nonzero(as_tuple=True)
        return torch.stack([xs.float().mean(), ys.float().mean()])

    return centroid(last) - centroid(first)


def test_direction_pairs_move_opposite_ways(synthetic):
    out = synthetic[0]
    shifts = {}
    for entry in read(out / "something-something-v2-train.json"):
        if entry["template"] in prepare.LINEAR_MOVES:
            frames = decode_all(out / prepare.VIDEO_DIR / f"{entry['id']}.webm")
            shifts[entry["template"]] = shift(frames, entry["placeholders"][0].split()[0])
    right, left = shifts[LEFT_TO_RIGHT], shifts[RIGHT_TO_LEFT]
    assert right[0] > 15 and left[0] < -15, (right, left)  # at least 15 px of a 64 px frame, opposite ways
    assert abs(right[1]) < 3 and abs(left[1]) < 3
    assert shifts["Moving [something] up"][1] < -15 < 15 < shifts["Moving [something] down"][1]


def area(frame, colour):
    target = torch.tensor(prepare.COLOURS[colour], dtype=torch.float32).view(3, 1, 1)
    return int(((frame.float() - target).abs().sum(dim=0) < 90).sum())  # static clutter counts the same in any frame


def test_camera_pair_grows_and_shrinks(synthetic):
    out = synthetic[0]
    growth = {}
    for entry in read(out / "something-something-v2-train.json"):
        if "camera" in entry["template"]:
            frames = decode_all(out / prepare.VIDEO_DIR / f"{entry['id']}.webm")
            colour = entry["placeholders"][0].split()[0]
            growth[entry["template"]] = area(frames[-1], colour) / max(area(frames[0], colour), 1)
    assert growth["Moving [something] towards the camera"] > 2.5  # radius 5-6 px -> 11-13 px: area x 3.4 to 6.8
    assert growth["Moving [something] away from the camera"] < 0.4


@pytest.mark.slow  # 13 s; the demo itself depends on it (`pytest -m slow tests/test_prepare.py`)
def test_pretrained_tower_learns_where_the_object_is():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**prepare.VISION_CONFIG))
    loss, baseline = prepare.pretrain_tower(tower, 200, seed=0)
    assert loss < 0.5 * baseline, (loss, baseline)  # the mean would be "nothing anywhere"; it must do far better


def test_tokenizer_and_towers_load(synthetic):
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    out = synthetic[0]
    tokenizer = AutoTokenizer.from_pretrained(out / "lm")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.unk_token == "<unk>"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    texts = [e[k] for e in read(out / "something-something-v2-validation.json") for k in ("label", "template")]
    texts += [t for t, _ in prepare.SYNTH_CLASSES]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("Holding [something]")[0] == tokenizer.bos_token_id
    lm = AutoModelForCausalLM.from_pretrained(out / "lm")
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == len(tokenizer)
    assert not lm.config.tie_word_embeddings and lm.config.hidden_size == 128
    vision = CLIPVisionModel.from_pretrained(out / "vision")
    with torch.no_grad():
        hidden = vision(pixel_values=torch.zeros(1, 3, 64, 64)).last_hidden_state
    assert hidden.shape == (1, 1 + (64 // 16) ** 2, 128)  # class token + 4x4 patches
    processor = read(out / "vision" / "preprocessor_config.json")
    assert processor["crop_size"] == {"height": 64, "width": 64}
    assert processor["image_mean"] == pytest.approx([0.4815, 0.4578, 0.4082], abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Real SSv2 layouts, with corrupt videos

ANNOTATIONS = [  # (id, template, label, placeholders)
    ("11", "Pushing [something] from left to right", "pushing a pen from left to right", ["a pen"]),
    ("12", "Taking [something] from [somewhere]", "taking a cup from the shelf", ["a cup", "the shelf"]),
    ("13", "Moving [something] up", "moving a phone up", ["a phone"]),  # stored as mp4
    ("14", "Moving [something] down", "moving a box down", ["a box"]),  # zero bytes
    ("15", "Holding [something]", "holding a mug", ["a mug"]),  # random bytes
    ("16", "Pushing [something] from right to left", "pushing a key from right to left", ["a key"]),  # truncated
    ("17", "Showing [something] next to [something]", "showing a pen next to a cup", ["a pen", "a cup"]),  # no video
]
CORRUPT = {"14": "empty file", "15": "unreadable", "16": "truncated", "17": "missing file"}


@pytest.fixture
def ssv2_root(tmp_path):
    root = tmp_path / "ssv2"
    videos = root / prepare.VIDEO_DIR
    videos.mkdir(parents=True)
    noise = torch.Generator().manual_seed(0)
    for clip_id in ("11", "12", "13", "16"):  # 3 s of noise at 12 fps: big frames, so truncation cuts many
        frames = torch.randint(0, 256, (36, 3, 32, 32), dtype=torch.uint8, generator=noise)
        VideoEncoder(frames, frame_rate=12).to_file(videos / f"{clip_id}.{'mp4' if clip_id == '13' else 'webm'}")
    (videos / "14.webm").write_bytes(b"")
    (videos / "15.webm").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=noise).numpy().data)
    whole = (videos / "16.webm").read_bytes()
    (videos / "16.webm").write_bytes(whole[: len(whole) // 4])
    entries = [{"id": i, "label": label, "template": t, "placeholders": p} for i, t, label, p in ANNOTATIONS]
    (root / "something-something-v2-train.json").write_text(json.dumps(entries[:5]))
    (root / "something-something-v2-validation.json").write_text(json.dumps(entries[5:]))
    (root / "something-something-v2-test.json").write_text(json.dumps([{"id": "99"}]))
    (root / "something-something-v2-labels.json").write_text(json.dumps(
        {prepare.strip_brackets(t): str(n) for n, (_, t, _, _) in enumerate(ANNOTATIONS)}))
    return root


def check_output(out, answer_index, expected_ids):
    records = read(out / "something-something-v2_train.json") + read(out / "something-something-v2_val.json")
    assert [r["id"] for r in records] == expected_ids
    by_id = {a[0]: a for a in ANNOTATIONS}
    for record in records:
        assert prepare.validate_record(record) is None
        assert record["conversations"][1]["value"] == by_id[record["id"]][answer_index]
    assert {r["id"]: r["video"] for r in records}["13"] == "13.mp4"
    report = {Path(r["path"]).stem: r["reason"] for r in read(out / "probe_report.json")}
    assert report.keys() == CORRUPT.keys()
    for clip_id, reason in CORRUPT.items():
        assert report[clip_id].startswith(reason), report


def test_ssv2_official_layout(ssv2_root, tmp_path):
    run("ssv2", "--root", ssv2_root, "--out", tmp_path / "template")
    check_output(tmp_path / "template", 1, ["11", "12", "13"])
    assert not (tmp_path / "template" / "something-something-v2_test.json").exists()  # test.json has no answers
    run("ssv2", "--root", ssv2_root, "--out", tmp_path / "label", "--answer", "label", "--prompt", "What happens?")
    check_output(tmp_path / "label", 2, ["11", "12", "13"])
    human = read(tmp_path / "label" / "something-something-v2_train.json")[0]["conversations"][0]
    assert human["value"] == "What happens?\n<video>"


@pytest.mark.parametrize("id2label", ["dict", "list", "labels.json"])
def test_ssv2_csv_layout(ssv2_root, tmp_path, id2label):
    templates = [t for _, t, _, _ in ANNOTATIONS]  # class n = ANNOTATIONS[n]
    mapping = {"dict": {str(n): t for n, t in enumerate(templates)},  # like Hugging Face's file: with brackets
               "list": [prepare.strip_brackets(t) for t in templates]}.get(id2label)
    if mapping is not None:  # else only the official labels.json, whose ids are the class ids
        (ssv2_root / "something-something-v2-id2label.json").write_text(json.dumps(mapping))
    lines = [f"/somewhere/else/{a[0]}.webm {n}" for n, a in enumerate(ANNOTATIONS)]  # only the stem (id) is used
    (ssv2_root / "train.csv").write_text("\n".join(lines[:5]) + "\n")
    (ssv2_root / "val.csv").write_text("\n".join(lines[5:]) + "\n")
    run("ssv2", "--root", ssv2_root, "--out", tmp_path / "csv")
    check_output(tmp_path / "csv", 1, ["11", "12", "13"])  # brackets restored, [somewhere] included
    run("ssv2", "--root", ssv2_root, "--out", tmp_path / "csv_label", "--answer", "label")  # labels from official JSON
    check_output(tmp_path / "csv_label", 2, ["11", "12", "13"])
    (ssv2_root / "something-something-v2-validation.json").unlink()
    with pytest.raises(SystemExit, match="--answer label with CSV files needs"):
        run("ssv2", "--root", ssv2_root, "--out", tmp_path / "csv_label", "--answer", "label")


def test_ssv2_bad_input(ssv2_root, tmp_path):
    with pytest.raises(SystemExit, match="no SSv2 annotations"):
        run("ssv2", "--root", tmp_path / "nothing", "--out", tmp_path / "o")
    (ssv2_root / "something-something-v2-train.json").write_text(json.dumps([{"id": "1", "label": "x"}]))
    with pytest.raises(SystemExit, match=r"train.json entry 0: missing key 'template'"):
        run("ssv2", "--root", ssv2_root, "--out", tmp_path / "o")
    (ssv2_root / "train.csv").write_text("11.webm 0\n12.webm 999\n")
    with pytest.raises(SystemExit, match=r"train.csv line 2: expected '<path> <class_id>'"):
        run("ssv2", "--root", ssv2_root, "--out", tmp_path / "o")


def test_bracket_template():
    assert prepare.bracket_template("Pushing something from left to right") == "Pushing [something] from left to right"
    assert prepare.bracket_template("Something falling like a rock") == "[Something] falling like a rock"
    assert prepare.bracket_template("Putting something, something and something on the table") == \
        "Putting [something], [something] and [something] on the table"
    assert prepare.bracket_template("Putting number of something onto something") == \
        "Putting [number of] [something] onto [something]"
    assert prepare.bracket_template("Poking a hole into something soft") == "Poking a hole into [something soft]"
    for template in ("Putting [number of] [something] onto [something]", "Moving [something] up"):
        assert prepare.bracket_template(template) == template  # already bracketed


# ---------------------------------------------------------------------------------------------------------------------
# LLaVA-format JSON


def turn(role, value):
    return {"from": role, "value": value}


def image_record(record_id, *turns, image="00000/a.jpg"):
    return {"id": record_id, "image": image, "conversations": list(turns)}


GOOD = [
    image_record("a", turn("human", "<image>\nDescribe."), turn("gpt", "A cat.")),
    image_record("b", turn("human", "What is it?\n<image>"), turn("gpt", "A dog."), turn("human", "Colour?"),
                 turn("gpt", "Brown."), image="00000/b.jpg"),  # multi-turn, <image> after the text
    {"id": "c", "conversations": [turn("human", "Say hi."), turn("gpt", "Hi.")]},  # text-only
]
BAD = [  # (record, expected start of the reason)
    ({"id": "d", "image": "00000/a.jpg"}, "'conversations' must be a non-empty list"),
    (image_record("e", turn("gpt", "<image>"), turn("human", "x")), "conversations[0] is from 'gpt'"),
    (image_record("f", turn("human", "<image><image>"), turn("gpt", "x")), "has 1 'image' path but 2 <video>/<image> placeholders"),
    (image_record("g", turn("human", "Look."), turn("gpt", "x")), "has 1 'image' path but 0 <video>/<image> placeholders"),
    (image_record("h", turn("human", "<image>"), turn("gpt", "It is <image>")), "conversations[1] (gpt) contains a <video>/<image> placeholder"),
    (image_record("i", turn("human", "<image>"), turn("gpt", "  ")), "conversations[1] (gpt) is empty"),
    ({"id": "j", "conversations": [turn("human", "<image> hi"), turn("gpt", "x")]}, "has a <video>/<image> placeholder but no 'video' or 'image' key"),
    (image_record("k", turn("human", "<image>"), turn("gpt", "x"), turn("human", "y")), "the conversation must alternate human/gpt turns and end with a gpt turn"),
    (image_record("l", turn("human", "<image>"), {"from": "gpt"}), "every turn of 'conversations' must be"),
    (image_record("m", turn("human", "<image>"), turn("gpt", "x"), image="00000/missing.jpg"), "missing file"),
    ("not a record", "record is not a JSON object"),
]


def test_llava_pretrain(tmp_path):
    root = tmp_path / "LLaVA-Pretrain"
    (root / "images" / "00000").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (root / "images" / "00000" / name).write_bytes(b"jpeg")
    records = [GOOD[0], BAD[0][0], GOOD[1]] + [record for record, _ in BAD[1:]] + [GOOD[2]]
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    run("llava-pretrain", "--root", root, "--val", 1)
    clean, val = read(root / "blip_laion_cc_sbu_558k.clean.json"), read(root / "blip_laion_cc_sbu_558k.val.json")
    assert len(val) == 1 and sorted(clean + val, key=lambda r: r["id"]) == GOOD
    report = read(root / "blip_laion_cc_sbu_558k.report.json")
    expected = [(1, BAD[0][1])] + [(i + 3, reason) for i, (_, reason) in enumerate(BAD[1:])]
    assert [r["index"] for r in report] == [index for index, _ in expected]
    for entry, (_, reason) in zip(report, expected):
        assert entry["reason"].startswith(reason), entry
    (root / "list.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SystemExit, match="list.json must hold a JSON list"):
        run("llava-pretrain", "--root", root, "--json", "list.json")


def test_validate_record_video():
    record = {"video": "1.webm", "conversations": [turn("human", "Describe.\n<video>"), turn("gpt", "Moving up")]}
    assert prepare.validate_record(record) is None
    record["conversations"][0]["value"] = "Describe.\n<video> and <video>"
    assert prepare.validate_record(record) == "has 1 'video' path but 2 <video>/<image> placeholders; expected 1"


def test_llava_small_set_keeps_a_training_split_and_an_empty_one_is_an_error(tmp_path):
    """6 records, 5 usable, the default --val 1000: 1 held out (at most a tenth, at least one), 4 to train on (it used
    to hold out all 5 and write an empty training split); a video's duration goes into its record; any layout
    nanovlm reads is cleaned as it came; no usable record is an error naming the report."""
    root = tmp_path / "small"
    (root / "images").mkdir(parents=True)
    VideoEncoder(torch.zeros(18, 3, 16, 16, dtype=torch.uint8), frame_rate=12).to_file(root / "images" / "v.webm")
    (root / "images" / "a.jpg").write_bytes(b"jpeg")
    records = [image_record(f"r{k}", turn("human", "<image>"), turn("gpt", "A cat."), image="a.jpg") for k in range(3)]
    records += [{"id": "v", "video": "v.webm", "conversations": [turn("human", "<video>"), turn("gpt", "Dark.")]},
                {"id": "m", "messages": [{"role": "user", "content": [{"type": "image", "path": "a.jpg"}]},
                                         {"role": "assistant", "content": "A cat."}]},
                {"id": "bad", "conversations": []}]
    (root / "small.json").write_text(json.dumps(records))
    run("llava", "--root", root, "--json", "small.json")
    clean, val = read(root / "small.clean.json"), read(root / "small.val.json")
    assert (len(clean), len(val)) == (4, 1) and [r["id"] for r in read(root / "small.report.json")] == ["bad"]
    by_id = {r["id"]: r for r in clean + val}
    assert by_id["v"]["duration"] == pytest.approx(1.5, abs=0.01) and "messages" in by_id["m"]
    (root / "bad.json").write_text(json.dumps(records[-1:] * 3))
    with pytest.raises(SystemExit, match=r"bad.json: no usable record of 3, nothing to train on; reasons in .*"
                                         r"bad.report.json"):
        run("llava", "--root", root, "--json", "bad.json")
    assert not (root / "bad.clean.json").exists()
