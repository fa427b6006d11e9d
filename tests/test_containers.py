"""The containers, codecs and image formats users have, made here with the installed FFmpeg and Pillow, decoded by
nanovlm (nanovlm/media.py) to the right frames, in the right orientation; frame sampling by time (fps). CPU.

Every frame is drawn so that its decoded pixels say which frame it is and which way is up: the top-left quadrant
red, the rest of the top half grey, the bottom half eight vertical stripes, white where a bit of the frame number
is set. A codec this FFmpeg cannot encode is skipped, and named as such in the test report.
"""

import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, features

from nanovlm.media import VisionPreprocess, frame_count, frame_indices, load_image, load_video, probe_duration

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line tool")
SIZE = 32
PRE = VisionPreprocess(SIZE, (0.5,) * 3, (0.5,) * 3)


def drawing(k, width=64, height=48):
    """Frame k: (height, width, 3) uint8."""
    frame = np.full((height, width, 3), 128, np.uint8)
    frame[:height // 2, :width // 2] = (255, 0, 0)
    for bit in range(8):
        if k >> bit & 1:
            frame[height // 2:, bit * width // 8:(bit + 1) * width // 8] = 255
        else:
            frame[height // 2:, bit * width // 8:(bit + 1) * width // 8] = 0
    return frame


def frame_numbers(frames):
    """Which frame each decoded (F, 3, SIZE, SIZE) frame is, from its stripes (sampled at their centres)."""
    stripes = frames[:, 1, 3 * SIZE // 4, SIZE // 16::SIZE // 8].float()  # (F, 8) green of each stripe
    return ((stripes > 128).long() << torch.arange(8)).sum(1).tolist()


def upright(frames):
    """The red quadrant is top left in every frame."""
    top_left, top_right = frames[:, :, SIZE // 4, SIZE // 4].float(), frames[:, :, SIZE // 4, 3 * SIZE // 4].float()
    return bool((top_left[:, 0] > 180).all() and (top_left[:, 1] < 80).all() and (top_right[:, 0] < 170).all())


def ffmpeg(path, frames, rate, *args, inputs=()):
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                    f"{frames.shape[2]}x{frames.shape[1]}", "-r", str(rate), "-i", "-", *inputs, *args, str(path)],
                   input=frames.tobytes(), check=True, capture_output=True)


ENCODERS = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout \
    if shutil.which("ffmpeg") else ""
PALETTE = ["-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse"]  # exact colours in a GIF
# name: (encoder, file, frame size, ffmpeg options)
CASES = {
    "H.264 mp4, wide": ("libx264", "a.mp4", (64, 36), ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "HEVC mp4": ("libx265", "a.mp4", (64, 48), ["-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params",
                                                "log-level=error"]),
    "H.264 mov": ("libx264", "a.mov", (48, 64), ["-c:v", "libx264", "-pix_fmt", "yuv420p"]),
    "VP8 webm, odd size": ("libvpx", "a.webm", (33, 17), ["-c:v", "libvpx", "-deadline", "realtime"]),
    "VP9 webm, odd size": ("libvpx-vp9", "a.webm", (33, 17), ["-c:v", "libvpx-vp9", "-deadline", "realtime"]),
    "VP9 mkv": ("libvpx-vp9", "a.mkv", (64, 48), ["-c:v", "libvpx-vp9", "-deadline", "realtime"]),
    "AV1 mkv, odd size": ("libaom-av1", "a.mkv", (33, 17), ["-c:v", "libaom-av1", "-cpu-used", "8", "-usage",
                                                            "realtime"]),
    "AV1 webm": ("libaom-av1", "a.webm", (64, 48), ["-c:v", "libaom-av1", "-cpu-used", "8", "-usage", "realtime"]),
    "MPEG-4 Part 2 avi, odd size": ("mpeg4", "a.avi", (33, 17), ["-c:v", "mpeg4", "-q:v", "2"]),
    "MJPEG avi, odd size": ("mjpeg", "a.avi", (33, 17), ["-c:v", "mjpeg", "-q:v", "2", "-pix_fmt", "yuvj444p"]),
    "animated GIF, odd size": ("gif", "a.gif", (33, 17), PALETTE),
    "H.264 mp4 with an AAC audio track": ("libx264", "a.mp4", (64, 48), ["-c:v", "libx264", "-pix_fmt", "yuv420p",
                                                                         "-c:a", "aac", "-shortest"]),
}


@pytest.mark.parametrize("case", CASES)
def test_container_and_codec_decode_to_the_right_frames(case, tmp_path):
    encoder, name, (width, height), options = CASES[case]
    if f" {encoder} " not in ENCODERS:
        pytest.skip(f"this FFmpeg cannot encode {encoder} ({case})")
    rate = 10  # 18 frames at 10 fps: 1.8 s, whose time centres fall inside frames, never on an edge
    frames = np.stack([drawing(k, width, height) for k in range(18)])
    audio = ["-f", "lavfi", "-i", "sine=duration=3"] if "audio" in case else []
    ffmpeg(tmp_path / name, frames, rate, *options, inputs=audio)
    by_index = load_video(str(tmp_path / name), 4, PRE)  # segment centres of the frames
    assert by_index.shape == (4, 3, SIZE, SIZE) and by_index.dtype == torch.uint8 and upright(by_index)
    assert frame_numbers(by_index) in ([2, 6, 11, 15], [2, 6, 10, 14])  # 18 frames, or 17 claimed (webm)
    assert probe_duration(str(tmp_path / name)) == pytest.approx(1.8, abs=0.11)
    by_time = load_video(str(tmp_path / name), 4, PRE, by_time=True)  # centres of 4 x 0.45 s
    assert frame_numbers(by_time) == [2, 6, 11, 15] and upright(by_time)


def test_rotation_metadata_and_variable_frame_rate(tmp_path):
    """A phone video stored landscape with a 90-degree display rotation decodes as FFmpeg displays it (the red
    quadrant bottom left); a variable frame rate (6 frames 1/12 s apart, then 2 a second) is sampled by time."""
    frames = np.stack([drawing(k) for k in range(16)])
    ffmpeg(tmp_path / "plain.mp4", frames, 12, "-c:v", "libx264", "-pix_fmt", "yuv420p")
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(tmp_path / "plain.mp4"), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(tmp_path / "rotated.mp4")], check=True)
    rotated = load_video(str(tmp_path / "rotated.mp4"), 2, PRE).float()
    assert (rotated[:, 0, 3 * SIZE // 4, SIZE // 8] > 180).all() and (rotated[:, 0, SIZE // 8, SIZE // 8] < 170).all()
    ffmpeg(tmp_path / "vfr.mkv", frames, 12, "-vf", "setpts='if(lt(N,6),N,9+(N-6)*6)/12/TB'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-pix_fmt", "yuv420p")
    starts = [k / 12 if k < 6 else 0.75 + (k - 6) * 0.5 for k in range(16)]  # when frame k is shown
    duration = probe_duration(str(tmp_path / "vfr.mkv"))
    assert 5.25 < duration <= 5.75
    count = frame_count(duration, 1, 8)
    times = [(k + 0.5) * duration / count for k in range(count)]
    expected = [max(k for k in range(16) if starts[k] <= t) for t in times]
    assert frame_numbers(load_video(str(tmp_path / "vfr.mkv"), count, PRE, by_time=True)) == expected
    assert expected != frame_indices(16, count)  # by frame index, the 6 fast frames would take a sixth of them


def test_fps_sampling_counts_and_times(tmp_path):
    """fps=1, max_frames=8: a 3 s clip gives 3 frames, a 20 s clip 8, at the centres of their seconds (of their
    2.5 s segments); in training one random frame per segment."""
    rate = 9  # centres 0.5 s, 1.25 s, ... fall inside frames at 9 fps
    for seconds, expected in ((3, [4, 13, 22]), (20, [11, 33, 56, 78, 101, 123, 146, 168])):
        path = tmp_path / f"{seconds}s.mp4"
        ffmpeg(path, np.stack([drawing(k) for k in range(seconds * rate)]), rate, "-c:v", "libx264", "-pix_fmt",
               "yuv420p", "-g", "30")
        duration = probe_duration(str(path))
        count = frame_count(duration, fps=1, max_frames=8)
        assert count == len(expected)
        assert frame_numbers(load_video(str(path), count, PRE, by_time=True)) == expected
        drawn = frame_numbers(load_video(str(path), count, PRE, torch.Generator().manual_seed(0), by_time=True))
        segment = seconds * rate / count  # frames per segment
        assert all(k * segment - 1 <= frame < (k + 1) * segment + 1 for k, frame in enumerate(drawn)), drawn


IMAGES = {"JPEG": ("a.jpg", {"quality": 95}), "PNG": ("a.png", {}), "WebP": ("a.webp", {"quality": 95}),
          "BMP": ("a.bmp", {}), "TIFF": ("a.tif", {}), "GIF, first frame": ("a.gif", {})}


@pytest.mark.parametrize("kind", IMAGES)
def test_image_formats(kind, tmp_path):
    name, options = IMAGES[kind]
    if kind == "WebP" and not features.check("webp"):
        pytest.skip("this Pillow cannot write WebP")
    first, second = Image.fromarray(drawing(3, 48, 48)), Image.fromarray(drawing(200, 48, 48))
    extra = {"save_all": True, "append_images": [second], "duration": 100} if name.endswith(".gif") else {}
    first.save(tmp_path / name, **options, **extra)
    frame = load_image(tmp_path / name, PRE)
    assert frame.shape == (1, 3, SIZE, SIZE) and upright(frame) and frame_numbers(frame) == [3]
