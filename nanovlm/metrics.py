"""Model FLOPs of a training step, and the peak they are measured against (for MFU).

Counted per part, so that a frozen tower is not billed as if it were trained:
  - LM blocks: 2N per token forward; backward 4N more when the LM is trained, 2N (activation gradients only)
    when it is frozen but gradients flow through it to the projector, nothing when nothing upstream trains.
  - LM head: as the blocks, but only on supervised tokens (we compute logits nowhere else).
  - Attention: per sample (packed samples do not attend to each other), causal: 2 n (n+1) H hd per layer forward,
    and twice that in backward whenever gradients flow through it: attention has no weights, so a frozen LM's
    attention backward costs what a trained one's does.
  - Vision: per frame, over its patches (bidirectional attention: 4 P^2 H hd per layer forward).
The peak is a datasheet number on known GPUs; elsewhere (CPUs, unknown GPUs) a dense matmul of the training
dtype timed at start-up, so MFU reads "fraction of what this machine's matmul can do".
"""

import time

import torch

# dense bf16 tensor-core peaks from the datasheets, most specific name first: an "H100 PCIe" is not an H100 SXM
GPU_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),
                 ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
                 ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12))


def datasheet_peak(name):
    """(bf16 FLOP/s, the key that matched) for a CUDA device name, or (None, None) for an unknown card."""
    for key, peak in GPU_PEAK_BF16:
        if key in name:
            return peak, key
    return None, None


def measured_matmul_peak(device, dtype, size=1024, seconds=0.5):
    g = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run must find it where it was saved
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - start)


def peak_flops(device, dtype):
    """(FLOP/s, where the number comes from)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        peak, key = datasheet_peak(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak, f"datasheet {key}"
    return measured_matmul_peak(device, dtype), "measured matmul"


def _body_params(module):
    return sum(p.numel() for name, p in module.named_parameters() if "layers." in name)


class FlopCounter:
    def __init__(self, model, train_vision, train_projector, train_lm):
        cfg = model.cfg
        self.cfg = cfg
        self.lm_body = _body_params(model.lm)
        self.head = cfg.lm.dim * cfg.lm.vocab_size
        self.vision_body = _body_params(model.vision)
        self.projector = sum(p.numel() for p in model.projector.parameters())
        upstream = train_vision or train_projector
        self.lm_mult = 6 if train_lm else 4 if upstream else 2
        self.attention_mult = 3 if train_lm or upstream else 1  # forward, + backward (2x) if gradients flow
        self.projector_mult = 6 if train_projector else 4 if train_vision else 2
        self.vision_mult = 6 if train_vision else 2
        self.patches = cfg.vision.grid ** 2 + cfg.vision.class_token

    def __call__(self, document_ids, num_supervised, num_frames):
        """FLOPs of one forward+backward of a micro-batch; document_ids (B, T) on the CPU, -1 = padding."""
        lm, v = self.cfg.lm, self.cfg.vision
        B, T = document_ids.shape
        per_row = torch.where(document_ids >= 0, document_ids + T * torch.arange(B)[:, None], -1)  # rows apart
        ids, counts = torch.unique_consecutive(per_row.flatten(), return_counts=True)
        n = counts[ids >= 0].double()  # sample lengths
        attention = (2 * n * (n + 1)).sum().item() * lm.n_heads * lm.head_dim * lm.n_layers  # forward, causal
        flops = self.lm_mult * (self.lm_body * n.sum().item() + self.head * num_supervised)
        flops += self.attention_mult * attention
        flops += self.projector_mult * self.projector * num_frames * self.cfg.tokens_per_frame
        vision_attention = 4 * self.patches ** 2 * v.dim * v.layers_used * num_frames
        flops += self.vision_mult * self.vision_body * self.patches * num_frames
        flops += self.vision_mult / 2 * vision_attention
        return flops
