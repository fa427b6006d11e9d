# Stage 1 on video: Something-Something-v2 (220k clips, 174 templates), CLIP ViT-L/14-336 + Vicuna-13B v1.5,
# projector only. Data: `python prepare.py ssv2 --root data/ssv2`.
# 16 frames x (24 / 2)^2 = 16 x 144 = 2,304 visual tokens per clip (2x2 pooling) + ~30 text tokens.
# 8 GPUs x 2 rows x 4 micro-steps = 64 rows of 4,736 tokens (2 clips each) = 128 clips per step;
# 169k train clips / 128 = ~1,320 steps per epoch.
out_dir = "out/pretrain_video"
vision_path = "openai/clip-vit-large-patch14-336"
lm_path = "lmsys/vicuna-13b-v1.5"
train_data = "data/ssv2/something-something-v2_train.json"
val_data = "data/ssv2/something-something-v2_val.json"
media_root = "data/ssv2/20bn-something-something-v2"
template = "plain"
num_frames = 16
pool_stride = 2
max_tokens = 4736
max_frames_per_row = 32
batch_size = 2
global_batch_size = 64
max_steps = 1320
train_vision, train_projector, train_lm = False, True, False
learning_rate = 1e-3
warmup_ratio = 0.03
activation_checkpointing = True
eval_interval = 250
ckpt_interval = 250
