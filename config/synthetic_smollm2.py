# The CPU demo's data and frozen vision tower with a real pretrained LM: SmolLM2-135M-Instruct (`python prepare.py
# smollm2`), LoRA adapters (rank 16) on every LM projection and the projector trained. The best recipe measured so
# far, not yet one that learns the task in 20 CPU minutes (README, Inference: 47% top-1 after 200 steps).
# plain template (no system prompt): 8 frames x 1 token + ~8 answer tokens = ~16 tokens per clip, ~15 clips per
# 256-token row; 2 ranks x 4 rows = ~120 clips a step (the chat template's ~44 tokens a clip gave ~9 a step).
out_dir = "out/synthetic_smollm2"
lm_path = "data/smollm2"
template = "plain"
num_frames = 8
pool_stride = 4
vision_select_layer = -1  # the demo tower was pretrained for its last layer
max_tokens = 256
max_frames_per_row = 128
batch_size = 4
global_batch_size = 8
max_steps = 200
train_vision, train_projector, train_lm = False, True, True
lora_rank = 16  # the LM trains through its adapters
lora_alpha = 32.0
learning_rate = 2e-3  # the projector
lm_learning_rate = 1e-3  # the adapters
warmup_ratio = 0.05
dtype = "bfloat16"  # measured faster than fp32 on both CPUs seen here (Xeon with AMX; EPYC with AVX512-BF16)
eval_interval = 100
eval_samples = 100
eval_batch_size = 50
max_new_tokens = 12
eval_label_set = True
log_interval = 10
ckpt_interval = 100
num_workers = 1
