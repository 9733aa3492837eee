"""Judging responses: the rule and model judges and refusal detection, shared by ERPO, evaluation and synthesis."""
