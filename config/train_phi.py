# Phi-4-mini-instruct (3.8B, fused qkv/gate_up, partial rotary, longrope) with SigLIP-so400m-384 on SSv2:
# projector + LM, the tokenizer's own chat template.
# SigLIP 384/14: 27 x 27 = 729 patches per frame, pooled by 3 -> 9 x 9 = 81 tokens; 16 frames = 1,296 visual
# tokens per clip + ~40 text; 3 clips per 4,096-token row.
# 8 GPUs x 2 rows x 4 micro-steps = 64 rows = ~192 clips per step; 2 epochs of 169k = ~1,760 steps.
out_dir = "out/phi"
init_from = "out/pretrain_phi/final"  # a stage-1 run of this pair (projector); use "hf" to start from scratch
vision_path = "google/siglip-so400m-patch14-384"
lm_path = "microsoft/Phi-4-mini-instruct"
train_data = "data/ssv2/something-something-v2_train.json"
val_data = "data/ssv2/something-something-v2_val.json"
media_root = "data/ssv2/20bn-something-something-v2"
template = "chat"
num_frames = 16
pool_stride = 3
vision_select_layer = -2
max_tokens = 4096
batch_size = 2
global_batch_size = 64
max_steps = 1760
train_vision, train_projector, train_lm = False, True, True
learning_rate = 2e-5
lm_learning_rate = 2e-5
activation_checkpointing = True
