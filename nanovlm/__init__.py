"""nanovlm: a minimal trainer for LLaVA-style video vision-language models."""
