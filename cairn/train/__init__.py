"""Training: recipes (pretrain, sft, dpo) built from shared blocks — data, losses, LoRA, the loop, checkpoints."""
