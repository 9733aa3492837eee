"""ERPO: candidate-step sampling, judging, step-level preference pairs, weight sync, and the iterative controller."""
