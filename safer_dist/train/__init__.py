"""Training: models and tokenizers, attention kernels, losses, SFT batches, the learner rank and the SFT controller."""
