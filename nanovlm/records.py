"""LLaVA records: their layouts, validation, and conversation templates -> token ids with per-turn labels.

What is notable:
- Labels come from explicit spans. Each template turns a conversation into (text, supervised)
  segments; the segments are tokenized separately and concatenated, so a label can never be off
  by a few tokens the way "tokenize again and subtract lengths" is when merges cross a boundary.
  For `chat` the spans are found by rendering prefixes of the conversation with the tokenizer's own
  chat template: the assistant's completion is what rendering one more turn adds after the
  generation prompt, end-of-turn token included, trailing whitespace not.
- A `<video>`/`<image>` placeholder is stored as one VISUAL_TOKEN and expanded to the medium's visual
  tokens (its frames x tokens_per_frame) when a sample is loaded (`expand_visual`).
"""

import functools
import json
import os
import re

import torch

from nanovlm.model import IGNORE, VISUAL_TOKEN

PLACEHOLDER = re.compile(r"<video>|<image>")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "chat", "vicuna_v1")


def to_llava(record):
    """A record in any layout nanovlm reads -> the LLaVA layout, unchanged if it is one already. ShareGPT-style
    `messages` of {"role", "content"} (the `transformers` chat format) become `conversations`; a content list of
    parts becomes its text parts and a placeholder per {"type": "image"/"video"} part, joined by newlines, the
    part's path ("path", "url" or its type's key) taken in order. `images`/`videos` are `image`/`video`. Raises
    ValueError (one line) for a `messages` record that is not of that form."""
    if not isinstance(record, dict) or not {"messages", "images", "videos"} & record.keys():
        return record
    out = {k: v for k, v in record.items() if k not in ("messages", "images", "videos")}
    out.update({kind: record[kind + "s"] for kind in ("image", "video") if kind + "s" in record and kind not in out})
    messages, paths = record.get("messages"), {"image": [], "video": []}
    if messages is None:
        return out
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), (str, list)) for m in messages):
        raise ValueError("every message of 'messages' must be {'role': str, 'content': str or a list of parts}")
    out["conversations"] = []
    for m in messages:
        pieces = [m["content"]] if isinstance(m["content"], str) else []
        for part in [] if pieces else m["content"]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "video") or kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"a content part of a {m['role']!r} message is {part!r}; expected "
                                 "{'type': 'text', 'text': str} or {'type': 'image'/'video', 'path': str}")
            pieces.append(part["text"] if kind == "text" else f"<{kind}>")
            path = part.get("path") or part.get("url") or part.get(kind)
            if kind != "text" and isinstance(path, str):
                paths[kind].append(path)
        out["conversations"].append({"from": m["role"], "value": "\n".join(pieces)})
    for kind in ("image", "video"):
        if paths[kind] and kind in out:
            raise ValueError(f"'{kind}' paths are given both in the message parts and in the record; give them once")
        out.update({kind: paths[kind]} if paths[kind] else {})
    return out


def check_record(record):
    """(the record in the LLaVA layout, why it is malformed or None)."""
    try:
        record = to_llava(record)
    except ValueError as e:
        return record, str(e)
    return record, validate_record(record)


def media_lists(record):
    """{"image": [paths], "video": [paths]} of a LLaVA record, for the keys it has (a path string is a list of one)."""
    return {k: [record[k]] if isinstance(record[k], str) else record[k] for k in ("image", "video") if k in record}


def validate_record(record):
    """Return why a LLaVA record is malformed, or None if it is fine. `image`/`video` are a path or a list of them,
    with as many placeholders (see ordered_media)."""
    if not isinstance(record, dict):
        return "record is not a JSON object"
    for key in ("video", "image"):
        value = record.get(key)
        if key in record and not (isinstance(value, str) and value or isinstance(value, list) and value and all(
                isinstance(path, str) and path for path in value)):
            return f"'{key}' must be a non-empty path string or a non-empty list of them"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list"
    if not all(isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
               for t in turns):
        return "every turn of 'conversations' must be {'from': str, 'value': str}"
    start = 1 if turns[0]["from"] == "system" else 0  # an optional system prompt comes first
    if start and PLACEHOLDER.search(turns[0]["value"]):
        return "the system turn contains a <video>/<image> placeholder"
    if len(turns) == start or (len(turns) - start) % 2:
        return "the conversation must alternate human/gpt turns and end with a gpt turn"
    for k in range(start, len(turns)):
        sender, value = turns[k]["from"], turns[k]["value"]
        expected = "user" if (k - start) % 2 == 0 else "assistant"
        if ROLES.get(sender) != expected:
            return (f"conversations[{k}] is from {sender!r}, expected "
                    f"{'human' if expected == 'user' else 'gpt'} (turns alternate, starting with human)")
        if expected == "assistant" and PLACEHOLDER.search(value):
            return f"conversations[{k}] (gpt) contains a <video>/<image> placeholder"
        if expected == "assistant" and not value.strip():
            return f"conversations[{k}] (gpt) is empty"
    tags, media = PLACEHOLDER.findall(" ".join(turn["value"] for turn in turns)), media_lists(record)
    if not media and tags:
        return "has a <video>/<image> placeholder but no 'video' or 'image' key"
    for kind, paths in media.items():
        found = len(tags) if len(media) == 1 else tags.count(f"<{kind}>")
        if found != len(paths):
            what = "<video>/<image>" if len(media) == 1 else f"<{kind}>"
            return f"has {len(paths)} '{kind}' path{'s' * (len(paths) > 1)} but {found} {what} placeholders; " \
                   f"expected {len(paths)}"
    return None


def ordered_media(record, media_root=""):
    """A valid LLaVA record's media in placeholder order: [(kind, path under media_root, index in its key's list)].
    With one kind of media every placeholder is that kind (LLaVA-Video-178K writes <image> for its videos); with
    both, <image> takes the next image and <video> the next video. A record's `data_source` (LLaVA-Video-178K)
    is the folder under media_root that its videos are in."""
    media = media_lists(record)
    tags = [tag[1:-1] for tag in PLACEHOLDER.findall(" ".join(turn["value"] for turn in record["conversations"]))]
    taken = dict.fromkeys(media, 0)
    ordered = []
    for tag in tags:
        kind = next(iter(media)) if len(media) == 1 else tag
        folder = os.path.join(media_root, str(record.get("data_source", ""))) if kind == "video" else media_root
        ordered.append((kind, os.path.join(folder, media[kind][taken[kind]]), taken[kind]))
        taken[kind] += 1
    return ordered


def with_time_instruction(conversations, counts, durations):
    """The conversation with a sentence after each video placeholder: its duration and the times of its frames
    (segment centres; counts and durations per placeholder, None for an image)."""
    slots = iter(zip(counts, durations))

    def note(match):
        count, duration = next(slots)
        if duration is None:
            return match.group(0)
        times = ", ".join(f"{(k + 0.5) * duration / count:.2f}s" for k in range(count))
        return f"{match.group(0)}\nThe video lasts {duration:.2f} seconds; {count} frames sampled at {times}."
    return [dict(turn, value=PLACEHOLDER.sub(note, turn["value"])) for turn in conversations]


@functools.cache  # asked once per tokenizer, not once per record
def _adds_bos(tokenizer):
    """Whether the LM was trained with a BOS it gets from its tokenizer (Llama yes, Qwen no)."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def leading_bos(tokenizer, template):
    """The text a `plain` or `vicuna_v1` sequence starts with: the tokenizer's BOS where the LM was trained with it
    (its tokenizer adds it), and for `plain` wherever the tokenizer has one (SmolLM2's <|im_start|>), because
    `plain` would otherwise begin with visual tokens: a pretrained LM turns the first tokens of a sequence into
    attention sinks (hidden-state norms up to ~21,000 in SmolLM2's layer 15 against ~280 after a BOS, README), and
    a sink's content is all but never read."""
    has = _adds_bos(tokenizer) or template == "plain" and tokenizer.bos_token_id is not None
    return tokenizer.bos_token if has else ""


def _plain(messages, tokenizer, add_generation_prompt):
    """LLaVA stage-1 pretraining: [bos] + visual tokens + answer + eos; the question is dropped.
    A text-only record becomes [bos] + answer + eos: plain language modelling on the answer."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != (1 if add_generation_prompt else 2):
        raise ValueError(f"the plain template takes one human and one gpt turn, got {len(turns)} turns")
    prompt = leading_bos(tokenizer, "plain") + "".join(PLACEHOLDER.findall(turns[0]["content"]))
    answer = [] if add_generation_prompt else [(turns[1]["content"] + tokenizer.eos_token, True)]
    return [(prompt, False)] + answer


def _vicuna_v1(messages, tokenizer, add_generation_prompt):
    """LLaVA's conv_vicuna_v1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." with the tokenizer's
    eos as "</s>" (it is "</s>" for Vicuna/Llama). The answer segment keeps its leading space, so it
    tokenizes the way it does inside the sentence."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else VICUNA_SYSTEM
    text = leading_bos(tokenizer, "vicuna_v1") + system + " "
    segments = []
    for message in messages:
        if message["role"] == "user":
            text += "USER: " + message["content"] + " ASSISTANT:"
        elif message["role"] == "assistant":
            segments += [(text, False), (" " + message["content"] + tokenizer.eos_token, True)]
            text = ""
    return segments + [(text, False)]


def _chat(messages, tokenizer, add_generation_prompt):
    """The tokenizer's own chat template. Supervised: each assistant completion, i.e. the tokens that
    rendering the turn adds after the generation prompt, up to the end-of-turn token (<|im_end|>,
    <|end|>, <|eot_id|>). The turn is cut where the tokens of "conversation ends here" and
    "conversation goes on" diverge, so an end-of-conversation token (Phi-3 appends eos) or the
    newline before the next turn is not taken as part of the answer."""
    def render(msgs, generation_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages, add_generation_prompt)
    segments, start = [], 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], generation_prompt=True)
        ends = render(messages[:k + 1])
        goes_on = render(messages[:k + 1] + [{"role": "user", "content": "x"}])
        if not (ends.startswith(before) and goes_on.startswith(before) and full.startswith(before)):
            raise RuntimeError("the tokenizer's chat template does not render conversations prefix by prefix "
                               "(it rewrites earlier turns), so assistant spans cannot be found; "
                               "use template='vicuna_v1' or another LM")
        ended = tokenizer(ends[len(before):], add_special_tokens=False, return_offsets_mapping=True)
        going = tokenizer(goes_on[len(before):], add_special_tokens=False)["input_ids"]
        n = len(os.path.commonprefix([ended["input_ids"], going]))
        while n and not tokenizer.decode(ended["input_ids"][n - 1:n]).strip():
            n -= 1  # whitespace after the end-of-turn token is the template's, not the model's to say
        end = len(before) + (ended["offset_mapping"][n - 1][1] if n else 0)
        if not (full.startswith(ends[:end]) and message["content"].strip() in full[len(before):end]):
            raise RuntimeError(f"cannot find assistant turn {k} in the rendered chat template; "
                               "use template='vicuna_v1' or another LM")
        segments += [(full[start:len(before)], False), (full[len(before):end], True)]
        start = end
    return segments + [(full[start:], False)]


def _tokenize(segments, tokenizer):
    """(text, supervised) segments -> (ids, labels). A placeholder becomes one VISUAL_TOKEN."""
    pieces = []  # (text, supervised), text None for a placeholder
    for text, supervised in segments:
        for j, part in enumerate(PLACEHOLDER.split(text)):
            if j:
                pieces.append((None, False))
            if part:
                pieces.append((part, supervised))
    texts = [text for text, _ in pieces if text is not None]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    ids, labels = [], []
    for text, supervised in pieces:
        piece = [VISUAL_TOKEN] if text is None else next(encoded)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    return ids, labels


def encode(conversations, tokenizer, template, for_generation=False):
    """A LLaVA conversation -> (ids, labels), labels unshifted with IGNORE where not supervised.
    With for_generation=True -> (prompt_ids, answer): everything up to where the last gpt answer
    begins, and that answer's text. A placeholder is one VISUAL_TOKEN in ids (see expand_visual).
    Raises ValueError if the template cannot encode this conversation."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in conversations]
    render = {"plain": _plain, "chat": _chat, "vicuna_v1": _vicuna_v1}[template]
    if not for_generation:
        return _tokenize(render(messages, tokenizer, False), tokenizer)
    prompt_ids, _ = _tokenize(render(messages[:-1], tokenizer, True), tokenizer)
    return prompt_ids, messages[-1]["content"]


def expand_visual(ids, num_visual, labels=None):
    """Repeat each VISUAL_TOKEN of a 1-D ids tensor as many times as its medium has visual tokens: num_visual, one
    count per placeholder in order (or an int for every placeholder); labels (if given) likewise, whose placeholder
    positions are IGNORE. Returns (ids, labels)."""
    repeats = torch.ones_like(ids)
    repeats[ids == VISUAL_TOKEN] = torch.as_tensor(num_visual, dtype=ids.dtype)
    return ids.repeat_interleave(repeats), None if labels is None else labels.repeat_interleave(repeats)


def read_records(json_path):
    try:
        with open(json_path) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {json_path}: {e}") from e
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got a {type(records).__name__}")
    for json_index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{json_path} record {json_index}: expected an object, got {type(record).__name__}; "
                             "the file must be a JSON list of LLaVA records")
    return records
