"""Where the files safer ships beside its code live: ``configs/`` (run configs, rulebooks, synth
prompt templates) and ``slurm/`` (the batch template and the Ray-on-SLURM scripts).

In a checkout (and an editable install) they are the top-level ``configs/`` and ``slurm/``
directories; a wheel carries the same two directories as package data under
``safer_dist/_shipped/`` (pyproject.toml maps them there). Everything that reads one of these
files finds it through :func:`shipped`, so the same code runs from a checkout, from an
editable install and from a wheel, in any current directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# The directories that ship; both layouts hold them side by side under one root.
SHIPPED_DIRS = ("configs", "slurm")


def shipped_root() -> Path:
    """The directory holding ``configs/`` and ``slurm/``: ``safer_dist/_shipped`` in a wheel,
    else the checkout the package is imported from."""
    package = Path(str(resources.files("safer_dist")))
    wheel = package / "_shipped"
    if (wheel / "configs").is_dir():
        return wheel
    return package.parent


def shipped(relative: str) -> Path:
    """The absolute path of a shipped file, e.g. ``shipped("configs/rules/default.yaml")``.

    Raises FileNotFoundError naming where it looked (an install that lost its package data)."""
    top = relative.split("/", 1)[0]
    if top not in SHIPPED_DIRS:
        raise ValueError(f"{relative!r}: shipped files live under {' or '.join(SHIPPED_DIRS)}/")
    path = shipped_root() / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative}: not found under {shipped_root()} (the installed safer lacks its "
                                "package data; reinstall it)")
    return path
