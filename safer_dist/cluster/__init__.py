"""Placement: Ray groups of learners and rollout workers, SLURM submission, and the GPU memory planner."""
