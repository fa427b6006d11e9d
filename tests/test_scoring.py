"""Label-set scoring (VLM.score, nanovlm/scoring.py): likelihoods equal a full forward, the best candidate is the
model's own choice, direction pairs, the frame-order control and the metrics. CPU, fp32."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from nanovlm import scoring
from nanovlm.model import VISUAL_TOKEN, from_pretrained

SIZE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in lm.parameters():  # std 0.02 makes every distribution near uniform; this makes them differ
            if p.ndim == 2:
                p.normal_(0, 0.5)
    lm.save_pretrained(root / "lm")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=SIZE, patch_size=16, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4)).save_pretrained(root / "vision")
    return from_pretrained(str(root / "vision"), str(root / "lm"), select_layer=-1).eval()


def prompts_and_frames(model):
    n = model.cfg.tokens_per_frame  # 4 per frame; clips of 2 and 3 frames, prompts of different lengths, the first
    # ending with its visual tokens (the plain template's prompt does)
    prompts = [torch.tensor([1, 5] + [VISUAL_TOKEN] * 2 * n), torch.tensor([1] + [VISUAL_TOKEN] * 3 * n + [9, 4])]
    return prompts, torch.randn(5, 3, SIZE, SIZE)


def test_score_is_the_log_likelihood_of_a_full_forward(model):
    torch.manual_seed(1)
    prompts, frames = prompts_and_frames(model)
    candidates = [torch.tensor([3, 2]), torch.tensor([10, 11, 12, 2]), torch.tensor([2]), torch.tensor([40, 41, 2])]
    scores = model.score(prompts, frames, candidates, chunk_tokens=4)  # two chunks, each continuing the prompts
    offsets = [0, 2, 5]
    for b, prompt in enumerate(prompts):
        for k, candidate in enumerate(candidates):
            ids = torch.cat([prompt, candidate])[None]
            with torch.no_grad():
                logits = model(ids, frames[offsets[b]:offsets[b + 1]])[0, len(prompt) - 1:-1]
            expected = F.log_softmax(logits.float(), -1).gather(1, candidate[:, None]).sum()
            torch.testing.assert_close(scores[b, k], expected, atol=1e-4, rtol=0)


def test_best_single_token_candidate_is_the_greedy_token(model):
    torch.manual_seed(2)
    prompts, frames = prompts_and_frames(model)
    candidates = [torch.tensor([t]) for t in range(64)]  # every token: the argmax must be greedy's first token
    best = model.score(prompts, frames, candidates, chunk_tokens=16).argmax(1).tolist()
    greedy = [answer[0] for answer in model.generate(prompts, frames, max_new_tokens=1)]
    assert best == greedy


def test_direction_pairs_from_class_names():
    labels = ["Holding [something]", "Moving [something] down", "Moving [something] up",
              "Moving [something] away from the camera", "Moving [something] towards the camera",
              "Pushing [something] from left to right", "Pushing [something] from right to left",
              "Putting [something] upright on the table"]  # "upright" is not "up": whole words only
    pairs = {(labels[i], labels[j]) for i, j in scoring.direction_pairs(labels)}
    assert pairs == {(labels[1], labels[2]), (labels[3], labels[4]), (labels[5], labels[6])}


def test_shuffle_frames_stays_within_each_clip():
    frames = torch.arange(9.0).view(9, 1, 1, 1).expand(9, 3, 2, 2)
    generator = torch.Generator().manual_seed(0)
    shuffled = scoring.shuffle_frames(frames, [4, 1, 4], generator)[:, 0, 0, 0].tolist()
    assert sorted(shuffled[:4]) == [0, 1, 2, 3] and shuffled[4] == 4 and sorted(shuffled[5:]) == [5, 6, 7, 8]
    assert shuffled != list(range(9))


def test_summary_from_a_confusion_matrix():
    labels = ["a down", "a up", "b"]
    confusion = torch.tensor([[8.0, 2, 0], [3, 7, 0], [0, 1, 9]])  # rows: reference, columns: prediction
    metrics = scoring.summary(confusion, torch.tensor(29.0), labels, scoring.direction_pairs(labels))
    assert metrics["top1"] == pytest.approx(24 / 30) and metrics["top5"] == pytest.approx(29 / 30)
    assert metrics["per_class"] == {"a down": 0.8, "a up": 0.7, "b": 0.9}
    assert metrics["pair_accuracy"] == pytest.approx(15 / 20) and metrics["pair_confusion"] == pytest.approx(5 / 20)
    assert metrics["pairs"] == {"a down | a up": [[8, 2], [3, 7]]}


MEMORY_SCRIPT = r"""
import sys, torch, transformers as tf
from nanovlm.model import VISUAL_TOKEN, from_pretrained

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

root, K = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root + "/lm")
tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4)).save_pretrained(root + "/vision")
model = from_pretrained(root + "/vision", root + "/lm", select_layer=-1).eval()
n = model.cfg.tokens_per_frame  # 16 per frame, 16 clips of 32 frames: prompts of ~530 tokens
prompts = [torch.cat([torch.tensor([1, 5 + b]), torch.full((32 * n,), VISUAL_TOKEN), torch.tensor([9] * b)])
           for b in range(16)]
frames = torch.randint(0, 256, (16 * 32, 3, 32, 32), dtype=torch.uint8)
g = torch.Generator().manual_seed(1)
candidates = [torch.randint(3, 1000, (int(torch.randint(2, 9, (), generator=g)),), generator=g) for _ in range(K)]
model.score(prompts, frames, candidates[:2], chunk_tokens=64)  # warm-up: the same allocations for every K
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
model.score(prompts, frames, candidates, chunk_tokens=64)
print(status("VmHWM") - before)
"""


def test_scoring_memory_does_not_grow_with_the_label_set(tmp_path):
    """174 candidates (SSv2's label set) against 8, the same prompts: the prompts' cache is never copied, and the
    candidates go through in chunks of whole candidates that continue it side by side."""
    peaks = {}
    for K in (8, 174):
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / str(K)), str(K)],
                                capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[K] = int(result.stdout.split()[-1])
    assert peaks[8] > 20e6, peaks  # the prompts' cache and activations: the measurement sees the scoring
    assert peaks[174] <= 1.3 * peaks[8], peaks
