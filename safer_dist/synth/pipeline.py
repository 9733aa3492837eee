"""``safer synth``: Ex-Ante SFT traces written by a teacher model, validated and filtered.

::

    prompts (JSONL / Parquet / save_to_disk: prompt, optional id, category, harmful, reference)
      │  skip ids already in accepted.jsonl or rejects.jsonl (a rerun continues)
      ▼  per round of synth.batch_size prompts:
    (a) category: the label, else a classifier (keyword baseline or a model)  classify.py
    (b) teacher prompt: the category's rules, carve-outs and strategy, the labels
        and the reference answer embedded (configs/synth/teacher_prompt.txt)  teachers.py
    (c) exante.validate                   ─┐
    (d) rule judge: harmful → safe outcome; benign → no refusal; strict: category, verdict
        and strategy agree with the labels ─┴→ accepted.jsonl | rejects.jsonl (+ reason)

Both files are append-only JSONL keyed by prompt ``id``, written after every round (flushed
and fsynced); a torn last line from a crash is dropped when the file is opened again. A
prompt the teacher could not answer (network errors after retries) is written to neither, so
the next run retries it. ``accepted.jsonl`` is SFT data: ``safer sft data.train=...``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import string
import time
from collections import Counter
from pathlib import Path

from safer_dist.cluster.group import cuda_available_in_cluster, start_ray, stop_ray
from safer_dist.config import Config, save_config
from safer_dist.data.chat import prompt_text
from safer_dist.data.records import load_records
from safer_dist.judging.judge import RuleJudge, is_refusal
from safer_dist.reasoning.exante import parse, validate
from safer_dist.reasoning.rules import Rulebook
from safer_dist.runtime.io import atomic_write_json
from safer_dist.runtime.log import get_logger
from safer_dist.synth.classify import KeywordClassifier, ModelClassifier
from safer_dist.synth.teachers import HttpTeacher, RayTeacher, TeacherUnavailable

log = get_logger("synth")

TEACHER_FIELDS = ("prompt", "category", "benign_guidance", "labels", "reference")
CLASSIFY_FIELDS = ("prompt", "categories")
REASONS = ("invalid_format", "unsafe", "over_refusal", "category_mismatch", "rule_verification", "strategy_mismatch")


def load_template(path: str | Path, fields: tuple[str, ...], key: str) -> str:
    """A ``str.format`` template using only ``fields`` and ``{prompt}``; ``ValueError`` names the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{key}={path}: no such template file")
    text = p.read_text(encoding="utf-8")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ValueError(f"{path}: bad template ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(names - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                         f"known: {', '.join('{' + f + '}' for f in fields)}")
    if "prompt" not in names:
        raise ValueError(f"{path}: the template must contain {{prompt}}")
    return text


# --- (a) labels ---------------------------------------------------------------------------

def assign_labels(records: list[dict], classifier, rulebook) -> list[dict]:
    """Fill ``category`` (classifier where missing), ``related_category`` (whose rules the
    teacher sees), ``harmful`` (label, else category != none), the expected ``strategy`` and
    ``category_source``. Returns new dicts."""
    missing = [i for i, r in enumerate(records) if not r.get("category")]
    guesses = dict(zip(missing, classifier.classify([prompt_text(records[i]["prompt"]) for i in missing]), strict=True)) if missing else {}
    known = set(rulebook.category_ids)
    out = []
    for i, rec in enumerate(records):
        rec = dict(rec)
        if i in guesses:
            guess, source = guesses[i]
            rec["related_category"] = rec.get("related_category") or guess
            rec["category"] = "none" if rec.get("harmful") is False else guess
            rec["category_source"] = source
        else:
            rec["category_source"] = "label"
            rec["related_category"] = rec.get("related_category") or rec["category"]
        if rec.get("harmful") is None:
            rec["harmful"] = rec["category"] != "none"
        if not rec.get("strategy"):
            if not rec["harmful"]:
                rec["strategy"] = "comply"
            elif rec["category"] in known:
                rec["strategy"] = rulebook.category(rec["category"]).default_strategy
        out.append(rec)
    return out


# --- (b) teacher prompt -------------------------------------------------------------------

def category_block(rulebook, cid: str | None) -> str:
    if not cid or cid == "none" or cid not in set(rulebook.category_ids):
        return ("none of the rulebook's categories applies: Risk category: none, cite no rule, "
                "verdict: not violated.")
    c = rulebook.category(cid)
    lines = [f"{c.id} {c.name}: {c.description}", "Rules:"]
    lines += [f"- [{r.id}] {r.text}" for r in c.rules]
    lines += ["Allowed (not violations):"] + [f"- {a}" for a in c.allowed]
    lines.append(f"Strategy when violated: {c.default_strategy}")
    return "\n".join(lines)


def render_teacher_prompt(template: str, rec: dict, rulebook) -> str:
    labels = ""
    if rec.get("harmful") is True:
        labels = f"Label: harmful; risk category {rec.get('category') or 'unknown'}"
        labels += f"; expected strategy {rec['strategy']}.\n" if rec.get("strategy") else ".\n"
    elif rec.get("harmful") is False:
        labels = "Label: benign, so it must not be refused: Risk category: none, verdict: not violated, Strategy: comply.\n"
    reference = f"Reference answer (adapt it, keep it safe):\n{rec['reference']}\n" if rec.get("reference") else ""
    return template.format(prompt=prompt_text(rec["prompt"]), category=category_block(rulebook, rec.get("related_category")),
                           benign_guidance=rulebook.benign_guidance, labels=labels, reference=reference)


# --- (c, d) validation and filter --------------------------------------------------------

def normalize_output(text: str) -> str:
    """Strip whitespace, a Markdown code fence around the trace, and chatter before ``<ex_ante>``."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text[: text.rfind("```")] if text.rstrip().endswith("```") else text
        text = text.strip()
    start = text.find("<ex_ante>")
    return text[start:] if start > 0 else text


def check_trace(record: dict, text: str, rulebook, *, strict: bool = True) -> list[tuple[str, str]]:
    """Why ``text`` is not an acceptable trace for ``record`` as (reason, detail) pairs, the
    most important first (``REASONS`` order); empty when accepted."""
    result = validate(text, rulebook)
    if not result.valid:
        return [("invalid_format", "; ".join(result.errors[:3]) or "invalid trace")]
    trace = result.trace
    harmful = bool(record.get("harmful"))
    out = []
    if harmful:
        score = RuleJudge(rulebook).score(record, text, 0)
        if score.safety < 1:
            out.append(("unsafe", score.reason.split(";")[0]))
    elif trace.strategy == "refuse_and_redirect" or is_refusal(trace.answer):
        out.append(("over_refusal", f"strategy {trace.strategy}; answer refuses: {is_refusal(trace.answer)}"))
    if strict:
        category, strategy = record.get("category"), record.get("strategy")
        if category and trace.category != category:
            out.append(("category_mismatch", f"trace says {trace.category}, label {category}"))
        if harmful:
            own = {r.id for r in rulebook.rules_for(category)} if category in set(rulebook.category_ids) else None
            cited_ok = bool(set(trace.cited_rules) & own) if own is not None else bool(trace.cited_rules)
            if trace.verdict != "violated" or not cited_ok:
                out.append(("rule_verification", f"verdict {trace.verdict}, cited {list(trace.cited_rules)}"))
        elif trace.verdict != "not violated":
            out.append(("rule_verification", f"benign request but verdict {trace.verdict}"))
        if strategy and trace.strategy != strategy:
            out.append(("strategy_mismatch", f"trace says {trace.strategy}, expected {strategy}"))
    return out


# --- (e) append-only outputs ----------------------------------------------------------------

class AppendLog:
    """An append-only JSONL file of records keyed by ``id``. Opening it drops a torn last line
    (a crash mid-write); each ``append`` is flushed and fsynced before it returns."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                log.warning("%s: dropping a partial last line (%d bytes) left by an interrupted run", path, len(data) - keep)
                with open(path, "r+b") as f:
                    f.truncate(keep)
        path.touch()  # both outputs exist after any run, even when one stays empty

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{lineno}: invalid JSON ({e.msg}); fix or remove the line") from None
        return out

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a", encoding="utf-8", newline="\n") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _exclusive(out_dir: Path):
    """One synth process per output directory (two would interleave their appends)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out_dir}: another `safer synth` is writing here") from None
        yield


def synth_round(records: list[dict], teacher, classifier, template: str, rulebook, cfg_synth,
                teacher_name: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(accepted, rejected, teacher failures) for one round of prompt records."""
    labelled = assign_labels(records, classifier, rulebook)
    asks = [render_teacher_prompt(template, r, rulebook) for r in labelled]
    outs = teacher.generate(asks, max_new_tokens=cfg_synth.max_new_tokens, temperature=cfg_synth.temperature)
    accepted, rejected, failed = [], [], []
    for rec, out in zip(labelled, outs, strict=True):
        base = {"id": rec["id"], "prompt": rec["prompt"], "harmful": rec["harmful"], "category": rec["category"],
                "related_category": rec["related_category"], "category_source": rec["category_source"]}
        if out.text is None:
            failed.append({**base, "error": out.error})
            continue
        text = normalize_output(out.text)
        problems = check_trace(rec, text, rulebook, strict=cfg_synth.strict)
        if problems:
            rejected.append({**base, "reason": problems[0][0], "detail": problems[0][1],
                             "reasons": [p[0] for p in problems], "output": out.text, "teacher": teacher_name})
        else:
            extra = {k: rec[k] for k in ("kind",) if rec.get(k)}
            accepted.append({**base, **extra, "response": text, "strategy": parse(text).trace.strategy,
                             "teacher": teacher_name})
    return accepted, rejected, failed


def prompts_path(cfg: Config) -> str:
    """The prompts ``safer synth`` reads: ``synth.prompts``, else ``data.erpo_prompts``."""
    return cfg.synth.prompts or cfg.data.erpo_prompts


def _preflight(cfg: Config):
    """(rulebook, teacher template, classifier template or None, prompt records); raises
    ``ValueError`` naming the file before anything is written."""
    s = cfg.synth
    rulebook = Rulebook.load(cfg.data.rulebook)
    template = load_template(s.prompt_template, TEACHER_FIELDS, "synth.prompt_template")
    classify_template = load_template(s.classifier_template, CLASSIFY_FIELDS, "synth.classifier_template") \
        if s.classifier == "model" else None
    prompts = prompts_path(cfg)
    if not Path(prompts).exists():
        unset = "" if s.prompts else " (synth.prompts is unset, so data.erpo_prompts: `make demo` writes the demo's)"
        raise ValueError(f"synth.prompts: {prompts} does not exist{unset}; set synth.prompts=FILE to your prompts")
    records = load_records(prompts, "prompts").to_list()
    if s.max_prompts:
        records = records[: s.max_prompts]
    known = set(rulebook.category_ids) | {"none"}
    for r in records:
        for key in ("category", "related_category"):
            if r.get(key) and r[key] not in known:
                raise ValueError(f"{prompts}: record {r['id']!r}: field {key!r}: {r[key]!r} is not a category of "
                                 f"{rulebook.source} (known: {', '.join(sorted(known))})")
    models = ([s.teacher_path or cfg.model.path] if s.teacher == "ray" else []) + \
             ([s.classifier_path] if s.classifier == "model" and s.classifier_path else [])
    for path in models:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path}: not a local Hugging Face model directory (no config.json)")
    return rulebook, template, classify_template, records


def synth_job(cfg: Config, *, keep_ray: bool = False) -> dict:
    """Run synthesis over ``synth.prompts`` (unset: ``data.erpo_prompts``); returns the summary (also in ``summary.json``).
    Validates the templates, prompts and model directories before anything is written."""
    s = cfg.synth
    rulebook, template, classify_template, records = _preflight(cfg)
    out_dir = Path(s.out_dir) if s.out_dir else cfg.run.dir / "synth"
    with _exclusive(out_dir):
        accepted_log, rejects_log = AppendLog(out_dir / "accepted.jsonl"), AppendLog(out_dir / "rejects.jsonl")
        done = {r["id"] for r in accepted_log.read()} | {r["id"] for r in rejects_log.read()}
        todo = [r for r in records if r["id"] not in done]
        save_config(cfg, out_dir / "config.yaml")
        log.info("%d prompts: %d already done, %d to synthesise -> %s", len(records), len(records) - len(todo), len(todo), out_dir)
        run, reasons, failures = Counter(), Counter(), []
        t0 = time.perf_counter()
        if todo:
            teacher, name = _make_teacher(cfg)
            extra = []
            try:
                classifier = KeywordClassifier(rulebook)
                if s.classifier == "model":
                    asked = teacher
                    if s.classifier_path:
                        asked, _ = _make_teacher(cfg, path=s.classifier_path)
                        extra.append(asked)
                    classifier = ModelClassifier(asked, classify_template, rulebook)
                for start in range(0, len(todo), s.batch_size):
                    batch = todo[start : start + s.batch_size]
                    acc, rej, failed = synth_round(batch, teacher, classifier, template, rulebook, s, name)
                    accepted_log.append(acc)
                    rejects_log.append(rej)
                    failures += failed
                    run.update(accepted=len(acc), rejected=len(rej), teacher_errors=len(failed))
                    reasons.update(r["reason"] for r in rej)
                    log.info("round %d: %d accepted, %d rejected, %d teacher errors (%d/%d done)", start // s.batch_size,
                             len(acc), len(rej), len(failed), start + len(batch), len(todo))
                    if len(failed) == len(batch):
                        raise TeacherUnavailable(
                            f"the teacher answered none of {len(batch)} prompts; first error: {failed[0]['error']}. "
                            f"{run['accepted'] + run['rejected']} results so far are saved in {out_dir}; rerun to continue"
                        )
            finally:
                teacher.shutdown()
                for x in extra:
                    x.shutdown()
                if not keep_ray:
                    stop_ray()  # a no-op when the teacher is an endpoint
        this_run = {**run, **({"rejected_by_reason": dict(reasons)} if reasons else {})}
        return _summarize(accepted_log.read(), rejects_log.read(), this_run, failures, out_dir, time.perf_counter() - t0)


def _make_teacher(cfg: Config, path: str | None = None):
    """(teacher, name) for ``synth.teacher``, or for the local model directory ``path``."""
    s = cfg.synth
    if s.teacher == "http" and path is None:
        return HttpTeacher.from_config(s, seed=cfg.run.seed), f"http:{s.model_name}"
    from safer_dist.cluster.rollout import RolloutGroup  # imports torch: only for a local teacher

    path = path or s.teacher_path or cfg.model.path
    start_ray(cfg)
    use_gpu = cfg.launch.device != "cpu" and cuda_available_in_cluster()
    group = RolloutGroup(cfg.model, cfg.rollout, path=str(path), device=cfg.launch.device, use_gpu=use_gpu)
    return RayTeacher(group, batch_size=cfg.rollout.batch_size, seed=cfg.run.seed), f"ray:{path}"


def _summarize(accepted: list[dict], rejected: list[dict], this_run: dict, failures: list[dict], out_dir: Path,
               wall_s: float) -> dict:
    by_reason = Counter(r["reason"] for r in rejected)
    summary = {
        "accepted": len(accepted), "rejected": len(rejected),
        "rejected_by_reason": {k: by_reason[k] for k in sorted(by_reason, key=lambda k: (-by_reason[k], k))},
        "this_run": this_run, "teacher_errors": [{"id": f["id"], "error": f["error"]} for f in failures[:20]],
        "num_teacher_errors": len(failures), "wall_s": wall_s,
        "accepted_path": str(out_dir / "accepted.jsonl"), "rejects_path": str(out_dir / "rejects.jsonl"),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def format_summary(summary: dict) -> str:
    """Counts by reason, for the terminal."""
    total = summary["accepted"] + summary["rejected"]
    run = summary["this_run"]
    lines = [f"this run: {run.get('accepted', 0)} accepted, {run.get('rejected', 0)} rejected, "
             f"{summary['num_teacher_errors']} teacher errors ({summary['wall_s']:.0f} s)",
             f"all runs: {summary['accepted']} accepted, {summary['rejected']} rejected of {total}"]
    for reason, n in summary["rejected_by_reason"].items():
        lines.append(f"  rejected {reason:20s} {n:6d}")
    if summary["num_teacher_errors"]:
        lines.append(f"teacher errors (not recorded; the next run retries them): {summary['num_teacher_errors']}, "
                     f"e.g. {summary['teacher_errors'][0]['error']}")
    lines += [f"accepted traces: {summary['accepted_path']}", f"rejects: {summary['rejects_path']}"]
    return "\n".join(lines)
