# Stage 1 (LLaVA-1.5 pretraining): LLaVA-Pretrain 558k image-caption pairs, CLIP ViT-L/14-336 + Vicuna-13B v1.5,
# projector only. Data: `python prepare.py llava-pretrain --root data/llava-pretrain`.
# One image = 24 x 24 = 576 visual tokens; + ~60 caption tokens = ~640 tokens per sample.
# 8 GPUs x 4 rows x 2 micro-steps = 64 rows of 2,560 tokens (~4 samples each) = ~256 samples per step,
# LLaVA's global batch; 558k / 256 = ~2,180 steps for one epoch.
out_dir = "out/pretrain"
vision_path = "openai/clip-vit-large-patch14-336"
lm_path = "lmsys/vicuna-13b-v1.5"
train_data = "data/llava-pretrain/blip_laion_cc_sbu_558k.clean.json"
val_data = "data/llava-pretrain/blip_laion_cc_sbu_558k.val.json"
media_root = "data/llava-pretrain/images"
template = "plain"
num_frames = 1
max_tokens = 2560
max_frames_per_row = 8
batch_size = 4
global_batch_size = 64
max_steps = 2180
train_vision, train_projector, train_lm = False, True, False
learning_rate = 1e-3
warmup_ratio = 0.03
activation_checkpointing = True
eval_interval = 500
ckpt_interval = 500
