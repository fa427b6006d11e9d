"""Label-set scoring (VLM.score, nanovlm/scoring.py): likelihoods equal a full forward, the best candidate is the
model's own choice, direction pairs, the frame-order control and the metrics. CPU, fp32."""

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from nanovlm import scoring
from nanovlm.model import VISUAL_TOKEN, from_pretrained

SIZE = 32


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
