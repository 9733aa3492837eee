"""Trace synthesis: teacher backends, category classification, and the validate-and-filter pipeline."""
