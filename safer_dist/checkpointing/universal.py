"""Resuming at another world size through DeepSpeed's universal checkpoint.

A ZeRO checkpoint's optimizer state is partitioned over the ranks that wrote it, so a run
with another number of learners cannot load it directly. :func:`ensure_universal` converts
``step_<N>/`` once, with DeepSpeed's own converter (``ds_to_universal --inject_missing_state``,
run as ``python -m safer_dist.checkpointing.universal`` so that its loads are weights-only, see
:mod:`safer_dist.checkpointing.safe_load`), into ``step_<N>/universal/``::

    step_<N>/universal/
      zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt   per-parameter optimizer state
      zero/optimizer_state.pt                              shared optimizer state
      *_model_states.pt                                    hard links to the step's own files
      UNIVERSAL_COMPLETE                                   written last

The conversion runs into a hidden temporary directory that is renamed into place, so a crash
leaves either no ``universal/`` or a complete one; a complete one is reused. Learners then load
``(step_<N>, "universal")`` with ``load_universal_checkpoint``. Per-rank RNG states do not carry
over to another world size (SFT draws no random numbers; the data order is a function of the
step), and neither does anything beyond the model, optimizer and scheduler state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safer_dist.checkpointing.safe_load import weights_only_torch_load
from safer_dist.runtime.io import atomic_write_dir
from safer_dist.runtime.log import get_logger

log = get_logger("universal")

UNIVERSAL_DIR = "universal"
DONE = "UNIVERSAL_COMPLETE"
_OPTIM_RANK = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(step_dir: Path) -> int:
    """Data-parallel world size that wrote ``step_dir`` (trainer_state, else the shard files)."""
    try:
        ws = json.loads((step_dir / "trainer_state.json").read_text()).get("world_size")
    except (OSError, ValueError):
        ws = None
    if ws:
        return int(ws)
    ranks = {int(m.group(1)) for p in step_dir.iterdir() if (m := _OPTIM_RANK.match(p.name))}
    return len(ranks)


def ensure_universal(step_dir: Path) -> Path:
    """``step_dir/universal`` (converted now, or reused when already complete)."""
    # checkpoint.py imports this module (to resume through a universal checkpoint).
    from safer_dist.checkpointing.checkpoint import CheckpointError

    step_dir = Path(step_dir)
    out = step_dir / UNIVERSAL_DIR
    if (out / DONE).is_file():
        log.info("reusing universal checkpoint %s", out)
        return out
    # Leftovers of an interrupted conversion are our own scratch output, not a checkpoint.
    for stale in [*step_dir.glob(f".{UNIVERSAL_DIR}.tmp-*"), *([out] if out.exists() else [])]:
        log.warning("removing an interrupted universal conversion %s", stale)
        shutil.rmtree(stale)
    # The ZeRO-3 converter writes a "latest_universal" pointer next to its output folder.
    pointer = step_dir / "latest_universal"
    had_pointer = pointer.exists()
    t0 = time.perf_counter()

    def fill(tmp: Path) -> None:
        cmd = [
            sys.executable, "-m", "safer_dist.checkpointing.universal", "--input_folder", str(step_dir), "--output_folder", str(tmp),
            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not had_pointer:
            pointer.unlink(missing_ok=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise CheckpointError(f"{step_dir}: conversion to a universal checkpoint failed (exit {proc.returncode}):\n{tail}")
        # The engine reads the model-states files (module weights, scheduler, client state) from
        # the same folder as zero/: link them rather than copy.
        for f in sorted(step_dir.glob("*_model_states.pt")):
            if (tmp / f.name).exists():  # the ZeRO-1/2 converter copies them itself
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        (tmp / DONE).write_text(f"{time.time():.3f}\n")

    # The conversion runs into a hidden temporary beside ``out`` (the same name the stale
    # glob above looks for) and is renamed into place only when complete.
    atomic_write_dir(out, fill)
    log.info("converted %s to a universal checkpoint in %.1f s", step_dir, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m safer_dist.checkpointing.universal`` = DeepSpeed's ``ds_to_universal`` with weights-only loads."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    with weights_only_torch_load():
        ds_to_universal.main(args)


if __name__ == "__main__":
    main()
