"""Training: the M&N co-training loop and what it needs (losses, schedule, LRG sampling, checkpoints, continuation,
distributed ranks, logging)."""
