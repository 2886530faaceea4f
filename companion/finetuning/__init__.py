"""Fine-tuning (chapter 8): sequence classification with early stopping, LoRA, instruction tuning (SFT),
preference tuning (DPO) and RL with verifiable rewards (GRPO). One module per idea."""
