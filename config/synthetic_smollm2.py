# The CPU demo's data and frozen vision tower with a real pretrained LM: SmolLM2-135M-Instruct (`python prepare.py
# smollm2`), LoRA adapters (rank 16) on every LM projection and the projector trained (README, Inference: what
# was measured, and why this recipe).
# plain template: BOS + 4 frames x 1 token + ~9 answer tokens = ~14 tokens per clip, ~18 clips per 256-token row.
# The LM begins to read the frames after a number of optimizer steps that grows little with the batch (8 rows a step:
# ~130, 4: ~130, 2: ~180 at a projector lr of 3e-3; ~120 at the 1e-2 below): so small steps, 1 row per rank.
out_dir = "out/synthetic_smollm2"
lm_path = "data/smollm2"
template = "plain"
num_frames = 4
pool_stride = 4
vision_select_layer = -1  # the demo tower was pretrained for its last layer
max_tokens = 256
max_frames_per_row = 128
batch_size = 1
global_batch_size = 2
max_steps = 390
train_vision, train_projector, train_lm = False, True, True
lora_rank = 16  # the LM trains through its adapters
lora_alpha = 32.0
learning_rate = 1e-2  # the projector: at 3e-3 it left the plateau ~60 steps later and reached 75.5% (README)
lm_learning_rate = 2e-3  # the adapters
warmup_ratio = 0.05
min_lr_ratio = 0.1  # the LM has just begun to read the frames when a cosine to 0 would be slowing it down
beta2 = 0.95  # a short run: AdamW's second moment forgets the first steps' large gradients within ~20 steps
dtype = "bfloat16"  # measured faster than fp32 on both CPUs seen here (Xeon with AMX; EPYC with AVX512-BF16)
eval_interval = 195
eval_samples = 200
eval_batch_size = 50
max_new_tokens = 12
eval_label_set = True
log_interval = 10
ckpt_interval = 195
num_workers = 1
