"""Evaluation: held-out generation and scoring, public safety sets, jailbreak attacks, the benchmark suite and reports."""
