"""Label-set evaluation (SSv2's 174 templates, the synthetic classes): every class name scored by likelihood.

What is notable:
- The candidates are the distinct reference answers of the validation set, tokenized by the training template,
  end-of-answer included, so a score is exactly the probability of the model saying that answer and stopping.
  VLM.score runs each prompt (its video included) once and continues its KV cache with every candidate.
- Direction pairs are found in the class names themselves ("... from left to right" / "... from right to left",
  "up" / "down", "towards" / "away from"): the classes that only the order of the frames tells apart.
- The frame-order control scores the same clips with their frames shuffled. A model that reads time falls to
  chance on the direction pairs; one that reads single frames does not fall at all.
- Everything is counted in one (K, K) confusion matrix per condition, summed over ranks: top-1, per-class
  accuracy and the pair confusions all come from it.
"""

import re

import torch

from nanovlm.records import encode
from nanovlm.model import IGNORE, VISUAL_TOKEN

OPPOSITES = (("left to right", "right to left"), ("up", "down"), ("towards", "away from"),
             ("closer to", "away from"), ("into", "out of"), ("opening", "closing"))


def candidates(dataset):
    """(class names, token ids of each as the model would answer it) from the dataset's last gpt turns."""
    labels = sorted({record["conversations"][-1]["value"] for record in dataset.records})
    ids = []
    for label in labels:
        conversation = dataset.records[0]["conversations"][:-1] + [{"from": "gpt", "value": label}]
        tokens, supervised = encode(conversation, dataset.tokenizer, dataset.template)
        ids.append(torch.tensor([t for t, s in zip(tokens, supervised) if s != IGNORE]))
    return labels, ids


def direction_pairs(labels):
    """Index pairs (i, j), i < j, of class names that differ only by a swap of opposite words."""
    index = {label: i for i, label in enumerate(labels)}
    pairs = set()
    for i, label in enumerate(labels):
        for a, b in OPPOSITES + tuple((b, a) for a, b in OPPOSITES):
            j = index.get(re.sub(rf"\b{a}\b", b, label))
            if j is not None and j != i:
                pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def frame_counts(prompts, tokens_per_frame):
    """How many frames each prompt's visual tokens stand for (its frames come in this order in a batch)."""
    return [int((prompt == VISUAL_TOKEN).sum()) // tokens_per_frame for prompt in prompts]


def shuffle_frames(frames, counts, generator):
    """frames (N, 3, H, W), counts[i] of them for sample i in order -> frames shuffled within each sample."""
    order, start = [], 0
    for n in counts:
        order += (start + torch.randperm(n, generator=generator)).tolist()
        start += n
    return frames[order]


def summary(confusion, top5, labels, pairs):
    """Metrics from a (K, K) confusion matrix (rows: reference, columns: prediction) and a top-5 hit count."""
    total = confusion.sum().clamp_min(1)
    per_class = confusion.diag() / confusion.sum(1).clamp_min(1)
    members = sorted({i for pair in pairs for i in pair})
    pair_rows = confusion[members].sum() if members else torch.tensor(0.0)
    metrics = {"top1": (confusion.diag().sum() / total).item(), "top5": (top5 / total).item(),
               "per_class": {label: round(acc.item(), 4) for label, acc in zip(labels, per_class)}}
    if members:  # accuracy over the pair classes, and how often a clip is taken for its pair's other member
        metrics["pair_accuracy"] = (confusion.diag()[members].sum() / pair_rows.clamp_min(1)).item()
        swapped = sum(confusion[i, j] + confusion[j, i] for i, j in pairs)
        metrics["pair_confusion"] = (swapped / pair_rows.clamp_min(1)).item()
        metrics["pairs"] = {f"{labels[i]} | {labels[j]}": [[int(confusion[i, i]), int(confusion[i, j])],
                                                           [int(confusion[j, i]), int(confusion[j, j])]]
                            for i, j in pairs}
    return metrics
