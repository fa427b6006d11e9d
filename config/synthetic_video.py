# The CPU demo on the embedded synthetic SSv2-style data (`python prepare.py`): 7 classes, three of them pairs that
# only the order of the frames tells apart. The vision tower was pretrained by prepare.py on single frames and stays
# frozen (as in LLaVA); the projector and the LM (random init) learn here.
# 64x64 frames / 16 px patches = 4 x 4 patches, pooled by 4 -> 1 token per frame; 8 frames = 8 visual tokens
# + ~8 text tokens = ~16 tokens per clip, ~15 clips per 256-token row (measured: 132 rows an epoch).
# 2 ranks x 4 rows x 1 micro-step = 8 rows = ~120 clips per step; 700 steps = ~42 epochs of the 2,000 clips.
out_dir = "out/synthetic_video"
template = "plain"
num_frames = 8
pool_stride = 4
vision_select_layer = -1  # the demo tower was pretrained for its last layer
max_tokens = 256
max_frames_per_row = 128
batch_size = 4
global_batch_size = 8
max_steps = 700
train_vision, train_projector, train_lm = False, True, True
learning_rate = 2e-3
lm_learning_rate = 2e-3
warmup_ratio = 0.03
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 350
eval_samples = 200
eval_batch_size = 50
max_new_tokens = 12
eval_label_set = True  # likelihood top-1 over the 7 classes, in order and with frames shuffled
log_interval = 25
ckpt_interval = 350
num_workers = 1
