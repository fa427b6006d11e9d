# Qwen2.5-1.5B-Instruct (qkv bias, tied embeddings, ChatML) with CLIP ViT-L/14-336 on SSv2: projector + LM.
# 16 frames x (24 / 2)^2 = 2,304 visual tokens per clip + ~40 text: 2 clips per 4,800-token row.
# 8 GPUs x 4 rows x 2 micro-steps = 64 rows = 128 clips per step; 2 epochs of 169k = ~2,640 steps.
out_dir = "out/qwen"
init_from = "hf"
vision_path = "openai/clip-vit-large-patch14-336"
lm_path = "Qwen/Qwen2.5-1.5B-Instruct"
train_data = "data/ssv2/something-something-v2_train.json"
val_data = "data/ssv2/something-something-v2_val.json"
media_root = "data/ssv2/20bn-something-something-v2"
template = "chat"
num_frames = 16
pool_stride = 2
max_tokens = 4800
batch_size = 4
global_batch_size = 64
max_steps = 2640
train_vision, train_projector, train_lm = False, True, True
learning_rate = 1e-4
lm_learning_rate = 2e-5
activation_checkpointing = True
