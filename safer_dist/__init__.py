"""safer: distributed training of Ex-Ante safety reasoning (SFT + step-level preference optimisation)."""

# The one place the version lives; pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = "0.1.0"
