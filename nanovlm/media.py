"""Pixels in: decode video frames and images into (F, 3, S, S) uint8 tensors at the tower's input size.

What is notable:
- Normalisation and input size come from the vision tower's own preprocessor_config.json, so a
  CLIP tower gets CLIP's mean/std and a SigLIP tower gets SigLIP's, with no flag to forget.
- Videos are decoded with torchcodec in approximate seek mode (no full-file scan), and only the
  frames we sample are decoded. WebM stores no frame count, so approximate mode estimates it from
  the duration; a truncated file decodes fewer frames than claimed, a variable frame rate makes the
  estimate wrong. We then scan (only on that rare path) and accept the file if it reaches >= 90% of
  the duration its header claims.
- Frame sampling is TSN-style for training (one random frame per equal segment) and segment
  centres for evaluation, over the frame indices (a fixed num_frames) or over time (fps: a clip's
  duration x fps frames, up to a budget). No horizontal flip: Something-Something has left/right classes.
- Frames are resized *whole* to the square input size: no centre crop, because the motion that
  defines an action can be at the edge of the frame. The aspect ratio is not kept: for actions the
  whole field of view matters more than undistorted shapes. Images follow LLaVA instead: pad to
  square with the mean colour, then resize, so a picture is never cut or squashed.
- Resizing is antialiased bilinear on uint8 (torch's fast path) for frames and images alike, so a
  run mixing both sees one pipeline. (CLIP's own processor resizes with bicubic; SigLIP's bilinear.)
- Frames stay uint8: they cross from the DataLoader workers at a quarter of fp32's bytes, and the model
  normalises them on the device with the tower's mean/std (`VLM.encode_frames`).
"""

import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# mean/std used when a tower ships no preprocessor_config.json, by model_type family
DEFAULT_MEAN_STD = {
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}


@dataclass(frozen=True)
class VisionPreprocess:
    size: int  # square input side of the vision tower, in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _side(value):
    """crop_size/size in HF processor configs is an int, {"height","width"} or {"shortest_edge"}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and value["height"] == value.get("width"):
            return value["height"]
        return value.get("shortest_edge")
    return None


def load_preprocess(vision_path):
    """Read input size and mean/std from a HF vision tower directory."""
    config_path = os.path.join(vision_path, "config.json")
    processor_path = os.path.join(vision_path, "preprocessor_config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {config_path}: {e}; point the vision dir at a HF vision tower") from e
    config = config.get("vision_config", config)  # a full CLIP/SigLIP config nests the tower's
    processor = {}
    if os.path.exists(processor_path):
        with open(processor_path) as f:
            processor = json.load(f)
    size = _side(processor.get("crop_size")) or _side(processor.get("size")) or config.get("image_size")
    model_type = config.get("model_type", "")
    family = "siglip" if "siglip" in model_type else "clip" if "clip" in model_type else None
    if "image_mean" in processor and "image_std" in processor:
        mean, std = processor["image_mean"], processor["image_std"]
    elif family is not None:
        mean, std = DEFAULT_MEAN_STD[family]
    else:
        raise ValueError(f"{processor_path}: no image_mean/image_std and model_type {model_type!r} in {config_path} "
                         "is neither CLIP nor SigLIP; add a preprocessor_config.json with image_mean and image_std")
    if not isinstance(size, int):
        raise ValueError(f"no input size in {processor_path} (crop_size/size) or {config_path} (image_size); add one")
    return VisionPreprocess(size, tuple(mean), tuple(std))


def segment_points(length, count, generator=None):
    """count points in [0, length) (float64), one in each of count equal segments: a random one if a generator is
    given (TSN training sampling), else the centre (evaluation)."""
    edges = torch.linspace(0, length, count + 1, dtype=torch.float64)
    width = edges[1:] - edges[:-1]
    if generator is None:
        offset = 0.5 * width
    else:
        offset = torch.rand(count, generator=generator, dtype=torch.float64) * width
    return edges[:-1] + offset


def frame_indices(num_available, num_frames, generator=None):
    """One frame index from each of num_frames equal segments of [0, num_available) (segment_points).
    Short clips repeat frames rather than return fewer, so every clip has num_frames frames."""
    return segment_points(num_available, num_frames, generator).long().clamp(0, num_available - 1).tolist()


def frame_count(duration, fps, max_frames):
    """Frames sampled by time from a clip of duration seconds: fps of them a second, at least 1, at most
    max_frames (LLaVA-Video: 1 fps up to a budget), so longer clips get more frames until the budget."""
    return min(max_frames, max(1, round(duration * fps)))


def probe_duration(path):
    """A video's duration in seconds, from its header (no scan), else from a scan of the file."""
    from torchcodec.decoders import VideoDecoder
    try:
        for mode in ("approximate", "exact"):
            meta = VideoDecoder(path, seek_mode=mode, num_ffmpeg_threads=1).metadata
            if meta.end_stream_seconds:
                return meta.end_stream_seconds - (meta.begin_stream_seconds or 0.0)
    except Exception as e:  # torchcodec's RuntimeError/ValueError with FFmpeg's message
        raise ValueError(f"cannot read the duration of {path}: {str(e).partition(chr(10))[0]}") from None
    raise ValueError(f"{path} has no duration and no frames")


def resize(frames, pre):
    """(F, 3, H, W) uint8 -> (F, 3, S, S) uint8 at the tower's input size."""
    if frames.shape[-2:] != (pre.size, pre.size):
        frames = F.interpolate(frames, size=(pre.size, pre.size), mode="bilinear", antialias=True)  # stays uint8
    return frames


def sample_frames(decoder, num_frames, generator, by_time):
    """num_frames frames from a torchcodec decoder, spread over its frame indices or, by_time, over its duration
    (so a clip with a variable frame rate is sampled evenly in time) -> (num_frames, 3, H, W) uint8."""
    meta = decoder.metadata
    if by_time:
        begin, end = meta.begin_stream_seconds or 0.0, meta.end_stream_seconds or 0.0
        if end <= begin:
            raise RuntimeError("no duration in the header")
        return decoder.get_frames_played_at((begin + segment_points(end - begin, num_frames, generator)).tolist()).data
    if not meta.num_frames:  # int(duration * fps) in approximate mode: can be one short, the last frame unused
        raise RuntimeError("no frame count in the header")
    return decoder.get_frames_at(frame_indices(meta.num_frames, num_frames, generator)).data


def load_video(path, num_frames, pre, generator=None, by_time=False):
    """Decode num_frames frames of a video file -> (num_frames, 3, S, S) uint8. Raises on a bad file. Rotation
    metadata is applied by torchcodec (as by FFmpeg's players); audio and other streams are ignored."""
    from torchcodec.decoders import VideoDecoder  # here, not at import: the GPU check runs without torchcodec
    decoder, frames = VideoDecoder(path, seek_mode="approximate", num_ffmpeg_threads=1), None  # what the header says
    if not by_time:  # (by time, approximate mode maps a time to a frame at the average rate: wrong for a VFR clip)
        try:
            frames = sample_frames(decoder, num_frames, generator, by_time)
        except RuntimeError:  # past the real end: a truncated file, or a wrong estimate of the frame count
            pass
    if frames is None:  # the exact index (a scan of the packets for WebM): every frame's time, the true end
        exact = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1)
        claimed, found = decoder.metadata.end_stream_seconds or 0.0, exact.metadata.end_stream_seconds or 0.0
        if not len(exact) or found < 0.9 * claimed:
            raise ValueError(f"truncated video: {found:.2f} of {claimed:.2f} s decodable")
        frames = sample_frames(exact, num_frames, generator, by_time)
    return resize(frames, pre)  # frames: (num_frames, 3, H, W) uint8


def _to_rgb(image, background):
    """Any Pillow mode -> RGB. Transparent pixels become the background colour, not black."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit greyscale (medical/scientific PNGs): convert("L") would clip at 255, so rescale
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
    if image.has_transparency_data:
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, ...


def load_image(path, pre):
    """An image as a 1-frame video -> (1, 3, S, S) uint8. An image over Image.MAX_IMAGE_PIXELS
    (89M pixels) raises when opened, before any pixel is decoded, and the caller counts it as a bad
    sample."""
    background = tuple(round(255 * m) for m in pre.mean)  # LLaVA pads with the mean colour
    with warnings.catch_warnings():
        # Pillow raises only above twice the limit and just warns between: a 277 KB PNG of 10000x9500
        # pixels would still cost 1.6 GB per worker to decode, pad and resize, so the warning is an error too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
            image = _to_rgb(image, background)
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    pixels = torch.from_numpy(np.array(square)).permute(2, 0, 1)  # (3, side, side) uint8
    return resize(pixels[None], pre)
