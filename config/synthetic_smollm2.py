# The CPU demo's data and vision tower with a real pretrained LM: SmolLM2-135M-Instruct (`python prepare.py smollm2`),
# its chat template, the projector and the LM trained. A short run that shows the real-LM path end to end on a CPU;
# the tiny demo LM (config/synthetic_video.py) is what learns the task in minutes.
# 8 frames x 1 token + ~44 chat-template tokens (SmolLM2's default system prompt included) = ~52 tokens per clip,
# ~4 clips per 256-token row; 2 ranks x 1 row = ~9 clips a step; ~135M LM parameters x 6 FLOPs x ~450 tokens
# = ~0.36 TFLOP a step.
out_dir = "out/synthetic_smollm2"
lm_path = "data/smollm2"
template = "chat"
num_frames = 8
pool_stride = 4
vision_select_layer = -1
max_tokens = 256
max_frames_per_row = 64
batch_size = 1
global_batch_size = 2
max_steps = 100
train_vision, train_projector, train_lm = False, True, True
learning_rate = 1e-3
lm_learning_rate = 5e-5
warmup_ratio = 0.05
eval_interval = 100
eval_samples = 56
eval_batch_size = 28
max_new_tokens = 16
eval_label_set = True
log_interval = 10
ckpt_interval = 100
num_workers = 1
