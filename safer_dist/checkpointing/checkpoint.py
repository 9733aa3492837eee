"""Checkpoint directories: ``<run>/checkpoints/<stage>/step_<N>/`` with ``COMPLETE`` last.

Contents of a step directory::

    step_<N>/                DeepSpeed shards (model, optimizer, scheduler) per rank
      rng_rank<r>.pt          every RNG of rank r (python, numpy, torch, cuda)
      trainer_state.json      counters that must survive a resume (TrainerState, world size)
      config.yaml             the resolved config of the run that wrote it
      COMPLETE                written last, after every rank returned from its save: a JSON
                              manifest (size and sha256 of every file above)
      universal/              only after a resume at another world size (safer_dist/checkpointing/universal.py)

Only directories with ``COMPLETE`` are ever resumed from or rotated away; an incomplete
one (a crash mid-save) is reported and left in place, or moved aside if its name is
needed again — never deleted. Resuming verifies the manifest first, so a truncated or
corrupted file fails with its name before any process starts. See docs/checkpoints.md.

Integrity without a serial pass on the driver: each learner rank fsyncs and hashes the files it
wrote itself (:func:`rank_digests`, right after its save, all ranks in parallel, each on its own
node), the driver hashes only what it wrote (trainer state, config) and whatever no rank
reported, and combines them into the manifest. Verifying a manifest hashes its files on a pool
of threads (hashlib releases the GIL), largest first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from safer_dist.config import CheckpointSection, Config, save_config, semantic_diff
from safer_dist.runtime.io import atomic_write_text
from safer_dist.runtime.log import get_logger

log = get_logger("checkpoint")

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Test hook (tests/e2e): SAFER_TEST_HANG_IN_SAVE=<step> or <stage>:<step> makes the save of that
# step block for ever after every shard, trainer_state.json and config.yaml are written and
# before COMPLETE, so a test can SIGKILL the job at exactly that point. Unset in normal use.
TEST_HANG_IN_SAVE = "SAFER_TEST_HANG_IN_SAVE"
MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, incomplete, or from an incompatible run)."""


@dataclass
class TrainerState:
    """Counters that must survive a resume. The data position is derived from ``step``."""

    stage: str = "sft"
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    # Learner ranks that wrote the checkpoint; another count on resume converts it to a
    # universal checkpoint.
    world_size: int = 0
    extra: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


class Checkpointer:
    """Saves, rotates and finds checkpoints of one stage."""

    def __init__(self, cfg: CheckpointSection, root: Path, *, stage: str = "sft", clock=time.monotonic):
        self.cfg = cfg
        self.stage = stage  # which settings must match on resume (config.RESUME_KEYS)
        self.root = Path(root)
        self._clock = clock
        self._last_save_time = clock()
        self._mine: set[Path] = set()  # checkpoints this job saved or resumed from
        self._pending: _Pending | None = None  # the background write in flight (checkpoint.async_save)

    def due(self, step: int) -> bool:
        """Whether to save after ``step``: every ``every_steps`` steps, or ``every_seconds``
        after the last save (or the start of this process)."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        return bool(self.cfg.every_seconds) and self._clock() - self._last_save_time >= self.cfg.every_seconds

    def save(self, group, state: TrainerState, config: Config) -> Path:
        """Every rank writes its shards; then the state, config and finally COMPLETE.

        With ``checkpoint.async_save`` the ranks copy their state to host memory and write it
        in the background (safer_dist/checkpointing/async_save.py): this returns once the copy
        is made, and COMPLETE follows when every rank's files are durable. A write in flight is
        waited for first; a stop's checkpoint is written synchronously."""
        from safer_dist.checkpointing import async_save
        from safer_dist.runtime import stop

        self.wait()
        background = self.cfg.async_save and not stop.requested()
        tag = f"step_{state.step}"
        path = self.root / tag
        if path.resolve() in self._mine and is_complete(path):
            return path  # already saved at this step by this job
        if path.exists():
            # An incomplete one is a crash mid-save; a complete one not ours is from an earlier
            # run of this directory (resume=none): either way keep it, under another name.
            kind = "complete checkpoint of an earlier run" if is_complete(path) else "incomplete checkpoint"
            aside = path.with_name(f"{tag}.{'old' if is_complete(path) else 'incomplete'}-{int(time.time())}")
            log.warning("moving %s %s aside to %s (not deleted)", kind, path, aside.name)
            path.rename(aside)
        self.root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        state.world_size = group.world_size
        # Each rank returns the sizes (and sha256) of the files it wrote, fsynced; in the
        # background, it reports them under async_save.marker_dir once they are.
        async_save.remove_markers(self.root, tag)  # a report left by an earlier, killed save
        in_background = {"background": True} if background else {}  # a synchronous save passes what it always did
        digests = group.save_checkpoint(str(self.root), tag, {"trainer_state": state.state_dict()},
                                        hash_files=self.cfg.hash_files, **in_background)
        t_shards = time.perf_counter() - t0
        atomic_write_text(path / "trainer_state.json", json.dumps(state.state_dict(), indent=1))
        save_config(config, path / "config.yaml")
        self._last_save_time = self._clock()
        if not background:
            self._complete(group, state, path, digests, t0, t_shards)
            return path
        snapshot = TrainerState(**state.state_dict())
        world_size = group.world_size

        def complete() -> None:
            reported = async_save.wait_for_ranks(self.root, tag, world_size, ASYNC_WRITE_TIMEOUT_S)
            self._complete(group, snapshot, path, reported, t0, time.perf_counter() - t0)
            async_save.remove_markers(self.root, tag)

        self._pending = _Pending(complete, name=f"checkpoint-complete-{tag}")
        _PENDING.add(self)
        log.info("checkpoint %s: state copied to host memory in %.2f s; writing in the background", path, t_shards)
        return path

    def wait(self) -> None:
        """Wait for the background write in flight (if any) to be complete (COMPLETE written);
        its failure is raised here."""
        pending, self._pending = self._pending, None
        _PENDING.discard(self)
        if pending is not None:
            pending.result()

    def _complete(self, group, state: TrainerState, path: Path, digests: dict, t0: float, t_shards: float) -> None:
        _test_hang_in_save(state)
        manifest = write_manifest(path, step=state.step, world_size=state.world_size, hash_files=self.cfg.hash_files,
                                  digests=digests)
        self._mine.add(path.resolve())
        group.last_checkpoint = str(path)
        log.info(
            "checkpoint %s saved in %.2f s (shards %.2f s, %d files, %.1f MB)", path, time.perf_counter() - t0,
            t_shards, len(manifest["files"]), sum(f["size"] for f in manifest["files"].values()) / 1e6,
        )
        self.rotate()

    def rotate(self) -> None:
        """Delete complete checkpoints beyond the newest ``keep_last``; never an incomplete one."""
        complete = [p for _, p in step_dirs(self.root) if is_complete(p)]
        for p in complete[: -self.cfg.keep_last]:
            log.info("rotating out checkpoint %s (keep_last=%d)", p, self.cfg.keep_last)
            shutil.rmtree(p)

    def latest_complete(self) -> Path | None:
        dirs = step_dirs(self.root)
        complete = [p for _, p in dirs if is_complete(p)]
        newest = complete[-1] if complete else None
        for n, p in dirs:
            if not is_complete(p) and (newest is None or n > _step(newest)):
                log.warning("skipping incomplete checkpoint %s (no %s); left in place", p, COMPLETE)
        return newest

    def resolve_resume(self) -> Path | None:
        """The checkpoint to resume from per ``checkpoint.resume`` (auto | none | PATH)."""
        spec = self.cfg.resume
        if spec == "none":
            return None
        if spec == "auto":
            return self.latest_complete()
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"resume={spec}: no such checkpoint directory")
        if not is_complete(path):
            raise CheckpointError(f"resume={spec}: checkpoint is incomplete (no {COMPLETE} marker)")
        return path

    def _set_aside_later(self, step: int, keep: Path | None) -> None:
        """Move aside complete checkpoints at or beyond ``step`` other than ``keep``: after
        resume=none (step 0) or resume=PATH they belong to another run of this directory, and
        must be neither resumed from later nor counted by rotation. Never deleted."""
        for n, p in step_dirs(self.root):
            if n >= step and is_complete(p) and (keep is None or p.resolve() != keep.resolve()):
                aside = p.with_name(f"{p.name}.old-{int(time.time())}")
                log.warning("moving checkpoint %s of an earlier run aside to %s (not deleted)", p, aside.name)
                p.rename(aside)

    def check_resume(self, config: Config) -> Path | None:
        """The checkpoint a resume would use, verified (manifest, config); None for a fresh start.

        Reads only; jobs call it before they write anything, so a bad checkpoint or config
        fails with the file's name and leaves the run directory as it was.
        """
        path = self.resolve_resume()
        if path is None:
            return None
        verify_manifest(path)
        saved = load_checkpoint_meta(path)
        diffs = semantic_diff(saved["config"], config, self.stage)
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: the config differs in ways that change the run:\n  "
                + "\n  ".join(diffs)
                + "\nUse resume=none (or a new run.name) to start fresh."
            )
        return path

    def restore(self, group, state: TrainerState, config: Config) -> Path | None:
        """Load the resume checkpoint into ``group`` and ``state``; None for a fresh start.

        A checkpoint written by another number of learners is converted once to a universal
        checkpoint (``step_<N>/universal``) and loaded from there.
        """
        path = self.check_resume(config)
        saved = load_checkpoint_meta(path) if path is not None else None
        self._set_aside_later(saved["trainer_state"].get("step", 0) if saved else 0, keep=path)
        if path is None:
            return None
        from safer_dist.checkpointing.universal import UNIVERSAL_DIR, ensure_universal, saved_world_size

        t0 = time.perf_counter()
        saved_ws = saved_world_size(path)
        if saved_ws and saved_ws != group.world_size:
            log.warning(
                "checkpoint %s was written by %d learner(s), this run has %d: resuming through a universal checkpoint "
                "(model, optimizer and scheduler state carry over; per-rank RNG states do not)",
                path, saved_ws, group.world_size,
            )
            ensure_universal(path)
            group.load_checkpoint(str(path), UNIVERSAL_DIR, universal=True)
        else:
            group.load_checkpoint(str(path.parent), path.name)
        state.load_state_dict(saved["trainer_state"])
        state.world_size = group.world_size
        self._mine.add(path.resolve())
        group.last_checkpoint = str(path)
        log.info("resumed from %s (step %d) in %.2f s", path, state.step, time.perf_counter() - t0)
        return path


# Seconds the driver waits for the learners' background writes of one checkpoint.
ASYNC_WRITE_TIMEOUT_S = 3600.0
_PENDING: set[Checkpointer] = set()


class _Pending:
    """``fn()`` on a daemon thread; :meth:`result` joins it and raises what it raised."""

    def __init__(self, fn, name: str):
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised by result()
                self._error = e

        self._thread = threading.Thread(target=run, daemon=True, name=name)
        self._thread.start()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def wait_for_writes() -> None:
    """Wait for every background checkpoint write of this process (the end of a stage)."""
    for ckpt in list(_PENDING):
        ckpt.wait()


def _step(p: Path) -> int:
    return int(_STEP_DIR.match(p.name).group(1))


def _test_hang_in_save(state: TrainerState) -> None:
    """The SAFER_TEST_HANG_IN_SAVE test hook (see its definition above)."""
    want = os.environ.get(TEST_HANG_IN_SAVE)
    if want and want in (str(state.step), f"{state.stage}:{state.step}"):
        log.warning("%s=%s: test hook hanging in the save of step %d before %s", TEST_HANG_IN_SAVE, want, state.step, COMPLETE)
        threading.Event().wait()


def _file_digest(path: Path, hash_files: bool, *, sync: bool = False) -> dict:
    """Size (and sha256) of ``path``; with ``sync``, fsynced too (before COMPLETE exists)."""
    with open(path, "rb") as f:
        out = {"size": os.fstat(f.fileno()).st_size}
        if hash_files:
            h = hashlib.sha256()
            while chunk := f.read(1 << 22):
                h.update(chunk)
            out["sha256"] = h.hexdigest()
        if sync:
            os.fsync(f.fileno())
    return out


# DeepSpeed's per-rank files (zero_pp_rank_<r>_mp_rank_00_*.pt, bf16_zero_pp_rank_<r>_...) and ours
# (rng_rank<r>.pt); every other file of a step directory is written by rank 0 or the driver.
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")
_HASH_THREADS = 8


def file_owner(name: str) -> int:
    """The learner rank that writes the step-directory file ``name`` (0 for shared files)."""
    m = _RANK_FILE.search(Path(name).name)
    return int(m.group(1) or m.group(2)) if m else 0


def _step_files(path: Path) -> list[Path]:
    return [f for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE and not f.name.endswith(".tmp") and ".tmp-" not in f.name]


def _digests(path: Path, names: list[str], hash_files: bool, *, sync: bool) -> dict[str, dict]:
    """``_file_digest`` of ``path/name`` for every name, on a thread pool, largest file first."""
    names = sorted(names, key=lambda n: -(path / n).stat().st_size)
    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(names)))) as pool:
        got = pool.map(lambda n: _file_digest(path / n, hash_files, sync=sync), names)
        return dict(zip(names, got))


def rank_digests(path: Path, rank: int, hash_files: bool) -> dict[str, dict]:
    """Size (and sha256) of the files of step directory ``path`` that ``rank`` wrote, fsynced:
    what a learner rank reports right after its save."""
    path = Path(path)
    mine = [str(f.relative_to(path)) for f in _step_files(path) if file_owner(f.name) == rank]
    return _digests(path, mine, hash_files, sync=True)


def write_manifest(path: Path, *, step: int, world_size: int, hash_files: bool,
                   digests: dict[str, dict] | None = None) -> dict:
    """Write ``path/COMPLETE``: the manifest of every file in the step directory. Last.

    ``digests``: what the ranks already computed (:func:`rank_digests`), by file name; the rest
    is hashed (and fsynced) here. A reported file must still have the size it was reported with."""
    digests = dict(digests or {})
    names = [str(f.relative_to(path)) for f in _step_files(path)]
    for name in [n for n in digests if n not in names]:
        raise CheckpointError(f"{path / name}: reported by a learner rank but not in the checkpoint")
    for name, d in digests.items():
        if (path / name).stat().st_size != d["size"] or (hash_files and "sha256" not in d):
            raise CheckpointError(f"{path / name}: changed after its rank reported it")
    digests.update(_digests(path, [n for n in names if n not in digests], hash_files, sync=True))
    files = {n: digests[n] for n in names}
    manifest = {"version": MANIFEST_VERSION, "step": step, "world_size": world_size,
                "completed_at": round(time.time(), 3), "files": files}
    atomic_write_text(path / COMPLETE, json.dumps(manifest, indent=1) + "\n")
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the COMPLETE entry itself is durable once save() returns
    finally:
        os.close(dir_fd)
    return manifest


def read_manifest(path: Path) -> dict | None:
    """The manifest in ``path/COMPLETE``; None for a checkpoint written before manifests."""
    f = path / COMPLETE
    text = f.read_text()
    if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):  # the marker before manifests: a timestamp
        return None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{f}: corrupted (not the JSON manifest this checkpoint was saved with)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{f}: corrupted (no file list in the manifest)")
    return manifest


_verified: dict[tuple[str, int], bool] = {}


def verify_manifest(path: Path) -> None:
    """Check every file of the manifest: present, same size, same sha256 (when recorded).

    Raises CheckpointError naming the first bad file. A checkpoint's verdict is cached per
    process (keyed by its COMPLETE file), so check_resume followed by restore hashes once.
    """
    path = Path(path)
    key = (str(path.resolve()), (path / COMPLETE).stat().st_mtime_ns)
    if key in _verified:
        return
    manifest = read_manifest(path)
    if manifest is None:
        log.warning("%s predates checkpoint manifests: its files cannot be verified", path)
        return
    t0 = time.perf_counter()
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing from checkpoint {path} (listed in its {COMPLETE} manifest)")
    hashed = [n for n, want in manifest["files"].items() if "sha256" in want]
    got_all = _digests(path, hashed, True, sync=False)
    for name, want in manifest["files"].items():
        f = path / name
        got = got_all.get(name) or _file_digest(f, False)
        if got["size"] != want["size"]:
            raise CheckpointError(
                f"{f}: truncated or overwritten ({got['size']} bytes, the manifest says {want['size']}); "
                f"resume from an older checkpoint with resume=PATH, or start fresh with resume=none"
            )
        if "sha256" in want and got["sha256"] != want["sha256"]:
            raise CheckpointError(
                f"{f}: corrupted (sha256 differs from the manifest); "
                f"resume from an older checkpoint with resume=PATH, or start fresh with resume=none"
            )
    _verified[key] = True
    log.info("verified %d files of %s in %.2f s", len(manifest["files"]), path, time.perf_counter() - t0)


def load_checkpoint_meta(path: Path) -> dict:
    """trainer_state and config of a complete checkpoint, with clear errors."""
    out = {}
    for name, key, loader in (("trainer_state.json", "trainer_state", json.loads), ("config.yaml", "config", yaml.safe_load)):
        f = path / name
        try:
            out[key] = loader(f.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing from checkpoint") from None
        except (ValueError, yaml.YAMLError) as e:
            raise CheckpointError(f"{f}: corrupted ({e})") from None
        if not isinstance(out[key], dict):
            raise CheckpointError(f"{f}: corrupted (not a mapping)")
    return out
