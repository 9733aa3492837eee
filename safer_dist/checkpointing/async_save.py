"""Asynchronous checkpoints (``checkpoint.async_save: true``): the GPUs train on while the
checkpoint is written.

::

    driver (Checkpointer.save)           learner rank r (Learner.save_checkpoint(background=True))
      wait for the write in flight          join this rank's previous write
      group.save_checkpoint(background) ->  DeepSpeed's save with a stand-in checkpoint engine:
                                              every file's state copied to host memory, nothing written
      trainer_state.json, config.yaml       a writer thread: each file to a temporary name, fsync,
      return: training goes on                rename; then size/sha256 of this rank's files (fsynced)
      a thread polls <root>/.async-<tag>/     -> <root>/.async-<tag>/rank<r>.json (or the error)
        for every rank's report, then
        writes COMPLETE (the manifest) and rotates

``COMPLETE`` exists only once every rank's files are durable, so a kill during the background
write leaves the step directory incomplete and resume takes the previous complete checkpoint.
A stop (SIGTERM/SIGUSR1) and the end of a stage wait for the write in flight
(:meth:`Checkpointer.wait`, :func:`wait_for_writes`); the stop's own checkpoint is written
synchronously. The host copy costs host memory of one rank's checkpoint files per learner
(ZeRO-1/2/3 partitions: the checkpoint's size over the ranks; under ZeRO-0/1/2 rank 0 also
copies the whole module), which `safer slurm submit`'s ``--mem`` counts
(safer_dist/cluster/host_memory.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from safer_dist.runtime.io import atomic_write_json
from safer_dist.runtime.log import get_logger

log = get_logger("checkpoint")

# Test hook (tests/e2e): SAFER_TEST_HANG_IN_BACKGROUND_WRITE=<tag> (e.g. step_8) makes each learner
# rank's background write of that checkpoint block for ever after its first file, so a test can
# SIGKILL the job in the middle of the write. Unset in normal use.
TEST_HANG_IN_BACKGROUND_WRITE = "SAFER_TEST_HANG_IN_BACKGROUND_WRITE"
POLL_S = 0.05


def marker_dir(root: str | Path, tag: str) -> Path:
    """Where the ranks report a background write of ``root/tag`` (beside the step directories,
    so no manifest lists it)."""
    return Path(root) / f".async-{tag}"


# -- learner rank side ---------------------------------------------------------------------------


def to_host(obj, memo: dict | None = None):
    """``obj`` with every tensor copied to host memory (CPU tensors copied too: training goes on
    updating the originals); containers rebuilt, a tensor present twice copied once."""
    import torch

    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, to_host(v, memo)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_host(v, memo) for v in obj)
    return obj


class _HostCopy:
    """Stands in for a DeepSpeed engine's checkpoint engine during one save: ``save`` keeps a
    host copy of each file's state instead of writing it; everything else is the real engine's."""

    def __init__(self, inner):
        self._inner = inner
        self.files: list[tuple[str, object]] = []

    def save(self, state_dict, path: str) -> None:
        self.files.append((str(path), to_host(state_dict)))

    def preserves_storage_sharing(self) -> bool:
        return False  # the host copy holds each view's elements only; no device-side clone first

    def __getattr__(self, name):
        return getattr(self._inner, name)


class BackgroundWriter:
    """One rank's writer thread (one write in flight at a time)."""

    def __init__(self):
        self._thread: threading.Thread | None = None

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def start(self, files: list[tuple[str, object]], *, step_dir: Path, rank: int, hash_files: bool) -> None:
        self.join()
        self._thread = threading.Thread(target=_write, args=(files, Path(step_dir), rank, hash_files), daemon=True,
                                        name=f"checkpoint-writer-{Path(step_dir).name}")
        self._thread.start()


WRITER = BackgroundWriter()


def save_in_background(engine, root: str, tag: str, client_state: dict, *, rank: int, hash_files: bool,
                       extra_files: dict[str, object]) -> None:
    """DeepSpeed's ``save_checkpoint`` into host memory (collective, as the real one), plus
    ``extra_files`` (name -> object, e.g. this rank's RNG state); then written by :data:`WRITER`.
    Returns once the state is copied: the caller may update the weights."""
    WRITER.join()  # the previous write is durable before this rank starts another
    host = _HostCopy(engine.checkpoint_engine)
    engine.checkpoint_engine = host
    try:
        engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = host._inner
    step_dir = Path(root) / tag
    files = host.files + [(str(step_dir / name), to_host(obj)) for name, obj in extra_files.items()]
    WRITER.start(files, step_dir=step_dir, rank=rank, hash_files=hash_files)


def _write(files: list[tuple[str, object]], step_dir: Path, rank: int, hash_files: bool) -> None:
    import torch

    from safer_dist.checkpointing.checkpoint import rank_digests

    report = marker_dir(step_dir.parent, step_dir.name) / f"rank{rank}.json"
    try:
        for i, (path, state) in enumerate(files):
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if i == 0 and os.environ.get(TEST_HANG_IN_BACKGROUND_WRITE) == step_dir.name:
                log.warning("%s=%s: test hook hanging in the background write of %s", TEST_HANG_IN_BACKGROUND_WRITE,
                            step_dir.name, step_dir)
                threading.Event().wait()
        atomic_write_json(report, {"digests": rank_digests(step_dir, rank, hash_files)})
    except BaseException as e:  # noqa: BLE001 - the driver reads the report and fails with it
        log.error("learner rank %d: background write of %s failed: %s", rank, step_dir, e)
        atomic_write_json(report, {"error": f"{type(e).__name__}: {e}"})


# -- driver side ---------------------------------------------------------------------------------


def wait_for_ranks(root: str | Path, tag: str, world_size: int, timeout_s: float) -> dict[str, dict]:
    """The digests every rank reported for its background write of ``root/tag``, by file name;
    CheckpointError naming the rank when one failed or did not report within ``timeout_s``."""
    from safer_dist.checkpointing.checkpoint import CheckpointError

    where = marker_dir(root, tag)
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(reports) < world_size:
        for r in range(world_size):
            f = where / f"rank{r}.json"
            if r not in reports and f.is_file():
                reports[r] = json.loads(f.read_text())
                if "error" in reports[r]:
                    raise CheckpointError(f"{Path(root) / tag}: learner rank {r} failed to write its files: "
                                          f"{reports[r]['error']}")
        if len(reports) < world_size:
            if time.monotonic() > deadline:
                missing = [r for r in range(world_size) if r not in reports]
                raise CheckpointError(f"{Path(root) / tag}: learner rank(s) {missing} did not finish writing within "
                                      f"{timeout_s:g} s")
            time.sleep(POLL_S)
    return {name: d for r in range(world_size) for name, d in reports[r]["digests"].items()}


def remove_markers(root: str | Path, tag: str) -> None:
    where = marker_dir(root, tag)
    for f in where.glob("rank*.json"):
        f.unlink(missing_ok=True)
    if where.is_dir():
        where.rmdir()
