"""MFU's two halves: the peak a GPU is measured against, and the FLOPs a step is billed (nanovlm/metrics.py)."""

import torch

from nanovlm.lm import LMConfig
from nanovlm.metrics import FlopCounter, datasheet_peak
from nanovlm.model import VLM, VLMConfig
from nanovlm.vision import VisionConfig


def test_datasheet_peak_takes_the_most_specific_name():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == (989e12, "H100")  # SXM
    assert datasheet_peak("NVIDIA H100 PCIe") == (756e12, "H100 PCIe")  # not the SXM figure
    assert datasheet_peak("NVIDIA H100 NVL") == (835e12, "H100 NVL")
    assert datasheet_peak("NVIDIA H200") == (989e12, "H200")
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == (312e12, "A100")
    assert datasheet_peak("NVIDIA GeForce GTX 1080") == (None, None)  # unknown: the trainer times a matmul


def test_attention_is_billed_its_backward_when_gradients_flow_through_a_frozen_lm():
    cfg = VLMConfig(vision=VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        norm_eps=1e-5, hidden_act="gelu", class_token=True),
                    lm=LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64))
    with torch.device("meta"):
        model = VLM(cfg)
    document_ids = torch.tensor([[0] * 6 + [1] * 4])  # two samples of 6 and 4 tokens
    attention = 2 * (6 * 7 + 4 * 5) * 4 * 8 * 2  # causal, per sample: 2 n (n+1) heads head_dim layers
    counts = {mode: FlopCounter(model, False, *mode)(document_ids, 0, 0) for mode in
              ((True, True), (True, False), (False, False))}  # (projector, LM) trained
    body = sum(p.numel() for n, p in model.lm.named_parameters() if "layers." in n) * 10
    assert counts[True, True] == 6 * body + 3 * attention  # forward, backward for weights and activations
    assert counts[True, False] == 4 * body + 3 * attention  # frozen LM: no weight gradients, attention's 2x stays
    assert counts[False, False] == 2 * body + attention  # nothing upstream trains: forward only
