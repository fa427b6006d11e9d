"""Ask a trained model about videos and images:

    python -m nanovlm.generate "What is happening?" --ckpt out/x/final --video a.webm b.webm --image c.jpg

What is notable:
- A run's final/ holds only what the run trained (trained.safetensors) and where the towers came from
  (nanovlm.json). The towers are loaded from their Hugging Face directories, then the trained weights laid over
  them; a trained key the model does not have is an error, not a silently unused tensor.
- The prompt is built by `records.encode`, the function training used, with the run's template and frame count,
  so the model sees at inference exactly the layout it was trained on. Frames are the segment centres.
- Tokens are printed as they are generated. Each step decodes the whole answer so far and prints what is new:
  a single token can be half of a UTF-8 character (byte-level BPE) or lose its leading space when decoded
  alone (SentencePiece), so decoding tokens one by one would print wrong text.
- One unreadable file is one line on stderr; the other files are still answered, and the exit code is 1.
"""

import argparse
import json
import os
import sys

import torch
from safetensors import SafetensorError

from nanovlm.data import load_tokenizer
from nanovlm.records import PLACEHOLDER, encode, expand_visual
from nanovlm.media import load_image, load_preprocess, load_video
from nanovlm.model import from_pretrained, load_trained

FINAL_KEYS = ("vision_path", "lm_path", "projector", "pool_stride", "vision_select_layer", "template", "num_frames")


def load_final(path, device="cpu"):
    """A run's out_dir/final -> (model in eval mode, tokenizer, the nanovlm.json dict). Raises ValueError with one
    line naming the file and what to do."""
    info_file, trained_file = os.path.join(path, "nanovlm.json"), os.path.join(path, "trained.safetensors")
    for file in (info_file, trained_file):
        if not os.path.isfile(file):
            raise ValueError(f"{file} not found: --ckpt must be the final/ directory a training run writes")
    try:
        with open(info_file) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_file} is not valid JSON: {e}") from None
    missing = [key for key in FINAL_KEYS if key not in info]
    if missing:
        raise ValueError(f"{info_file} lacks {', '.join(missing)}: was it written by this version of train.py?")
    for key in ("vision_path", "lm_path"):
        if not os.path.isdir(info[key]):
            raise ValueError(f"{key}={info[key]!r} in {info_file} is not a directory: run from the directory "
                             "training ran in, or edit the path in nanovlm.json")
    try:
        model = from_pretrained(info["vision_path"], info["lm_path"], device, projector=info["projector"],
                                pool_stride=info["pool_stride"], select_layer=info["vision_select_layer"])
        tokenizer = load_tokenizer(path)
    except (OSError, KeyError) as e:
        raise ValueError(e.args[0] if isinstance(e, KeyError) else str(e)) from None
    try:
        load_trained(model, trained_file)  # the parts the run did not train come from the towers
    except SafetensorError as e:
        raise ValueError(f"{trained_file}: {e}") from None
    return model.eval(), tokenizer, info


def prompt_ids(question, kind, tokenizer, info, tokens_per_frame):
    """The generation prompt for a question about a video, an image or nothing (kind None): 1-D ids with the
    placeholder expanded to one VISUAL_TOKEN per visual token of the media."""
    placeholder = {"video": "\n<video>", "image": "\n<image>", None: ""}[kind]
    conversation = [{"from": "human", "value": question + placeholder}, {"from": "gpt", "value": ""}]
    ids, _ = encode(conversation, tokenizer, info["template"], for_generation=True)
    num_frames = {"video": info["num_frames"], "image": 1, None: 0}[kind]
    ids, _ = expand_visual(torch.tensor(ids), num_frames * tokens_per_frame)
    return ids


class Printer:
    """The stream callback of VLM.generate: prints the new text of the (single) answer as it grows."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown, self.ended = tokenizer, [], "", False

    def __call__(self, tokens):  # tokens: (1,)
        token = int(tokens[0])
        self.ended = self.ended or token == self.tokenizer.eos_token_id
        if not self.ended:
            self.ids.append(token)
            self.show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def show(self, text, last=False):
        if last or not text.endswith("\ufffd"):  # an incomplete UTF-8 character waits for its next bytes
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def main(argv=None):
    parser = argparse.ArgumentParser(description="answer a question about videos and images with a trained model")
    parser.add_argument("question", nargs="?")
    parser.add_argument("--ckpt", required=True, help="a training run's out_dir/final")
    parser.add_argument("--video", nargs="+", default=[], help="video files, each answered on its own")
    parser.add_argument("--image", nargs="+", default=[], help="image files, each answered on its own")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.question is None:  # a question after a file list is taken for a file: argparse's nargs="+" is greedy
        parser.error("no question: put it before --video/--image, or end their lists with --")
    if PLACEHOLDER.search(args.question):
        parser.error("the question must not contain <video>/<image>: the placeholder is added for each file")
    try:
        model, tokenizer, info = load_final(args.ckpt, args.device)
        preprocess = load_preprocess(info["vision_path"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator(args.device).manual_seed(args.seed)
    media = [(path, "video") for path in args.video] + [(path, "image") for path in args.image] or [(None, None)]
    failed = 0
    for path, kind in media:
        try:
            if kind is not None and not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            frames = load_video(path, info["num_frames"], preprocess) if kind == "video" else \
                load_image(path, preprocess) if kind == "image" else None
        except Exception as e:  # any decoder / Pillow failure: this file is skipped, the others are answered
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"cannot read {path}: {message}", file=sys.stderr, flush=True)
            failed += 1
            continue
        ids = prompt_ids(args.question, kind, tokenizer, info, model.cfg.tokens_per_frame)
        if path is not None:
            print(f"{path}: ", end="", flush=True)
        printer = Printer(tokenizer)
        [answer] = model.generate([ids], None if frames is None else frames.to(args.device), args.max_new_tokens,
                                  args.temperature, args.top_p, tokenizer.eos_token_id, generator, stream=printer)
        printer.show(tokenizer.decode(answer, skip_special_tokens=True), last=True)  # what the stream held back
        print(flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
