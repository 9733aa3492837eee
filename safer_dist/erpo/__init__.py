"""ERPO, driver side: the iterative controller, ranking candidates into pairs, and the pairs as training data."""
