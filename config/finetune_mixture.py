# Stage 2 on a mixture (LLaVA-Video style): LLaVA-Video-178K clips sampled at 1 fps (up to 32 frames, so a 12 s clip
# gives 12 and a 3-minute one 32), LLaVA-OneVision single images, text-only instructions to keep the LM's language;
# each JSON cleaned by `python prepare.py llava --root ... --json ...` (durations written, a held-out split).
# Qwen2.5-7B-Instruct with its chat template, CLIP ViT-L/14-336: 24 x 24 patches pooled by 3 = 64 tokens a frame,
# so a 32-frame clip is 2,048 visual tokens of a 4,096-token row; 8 GPUs x 1 row x 8 micro-steps = 64 rows a step.
# An epoch draws as many samples as the three sets hold, half of them clips, 30% images, 20% text (README, Data).
out_dir = "out/finetune_mixture"
init_from = "out/pretrain/final"  # stage 1's projector
vision_path = "openai/clip-vit-large-patch14-336"
lm_path = "Qwen/Qwen2.5-7B-Instruct"
_video = "data/LLaVA-Video-178K/0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed"  # (_: not a setting)
datasets = [
    dict(name="video", train_data=f"{_video}.clean.json", val_data=f"{_video}.val.json",
         media_root="data/LLaVA-Video-178K", weight=0.5, fps=1.0, max_frames=32),
    dict(name="images", train_data="data/onevision/si.clean.json", val_data="data/onevision/si.val.json",
         media_root="data/onevision/images", weight=0.3),
    dict(name="text", train_data="data/text/instruct.clean.json", media_root="data/text", weight=0.2),
]
template = "chat"
pool_stride = 3
max_tokens = 4096
max_frames_per_row = 64
batch_size = 1
global_batch_size = 64
max_steps = 5000
train_vision, train_projector, train_lm = False, True, True
learning_rate = 1e-5
lm_learning_rate = 1e-5
warmup_ratio = 0.03
activation_checkpointing = True
eval_interval = 500
eval_samples = 200
ckpt_interval = 500
