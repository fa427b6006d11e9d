# The CPU demo: the embedded synthetic SSv2-style data (`python prepare.py`), towers trained from scratch.
# 64x64 frames / 8px patches = 8 x 8 patches, pooled by 2 -> 16 tokens per frame; 8 frames = 128 visual tokens
# + ~12 text tokens = ~140 tokens per clip, ~7 clips per 1,024-token row.
# 2 ranks x 2 rows x 1 micro-step = 4 rows = ~28 clips per step.
out_dir = "out/synthetic_video"
template = "plain"
num_frames = 8
pool_stride = 2
vision_select_layer = -1  # a tower trained from scratch: use all of it
max_tokens = 1024
max_frames_per_row = 64
batch_size = 2
global_batch_size = 4
max_steps = 450
train_vision, train_projector, train_lm = True, True, True
learning_rate = 2e-3
lm_learning_rate = 2e-3
vision_learning_rate = 2e-3
warmup_ratio = 0.05
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 150
eval_samples = 200
eval_batch_size = 50
max_new_tokens = 12
log_interval = 10
ckpt_interval = 150
num_workers = 1
