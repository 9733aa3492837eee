"""Checkpoints: the step-directory protocol with manifest, universal (world-size) conversion, safe loading, Hugging Face export."""
