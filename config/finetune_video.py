# Stage 2 on video: start from stage 1's projector (config/pretrain_video.py), train projector + LM.
# Same token arithmetic as stage 1: 16 frames x 144 = 2,304 visual tokens per clip, 2 clips per 4,736-token row;
# 8 GPUs x 1 row x 8 micro-steps = 64 rows = 128 clips per step; 3 epochs of 169k clips = ~3,960 steps.
out_dir = "out/finetune_video"
init_from = "out/pretrain_video/final"  # the projector weights stage 1 trained
vision_path = "openai/clip-vit-large-patch14-336"
lm_path = "lmsys/vicuna-13b-v1.5"
train_data = "data/ssv2/something-something-v2_train.json"
val_data = "data/ssv2/something-something-v2_val.json"
media_root = "data/ssv2/20bn-something-something-v2"
template = "vicuna_v1"
num_frames = 16
pool_stride = 2
max_tokens = 4736
max_frames_per_row = 32
batch_size = 1
global_batch_size = 64
max_steps = 3960
train_vision, train_projector, train_lm = False, True, True
learning_rate = 2e-5
lm_learning_rate = 2e-5
warmup_ratio = 0.03
activation_checkpointing = True
eval_interval = 500
ckpt_interval = 500
