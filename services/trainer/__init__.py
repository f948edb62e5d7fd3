"""Trainer service: GRPO updates on the selected problems from a checkpoint, writing the next checkpoint."""
