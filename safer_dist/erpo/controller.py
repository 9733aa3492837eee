"""The ERPO controller: iterative, length-controlled step-level preference optimisation.

::

    iteration t (policy π_t; rollout workers hold π_t, learners hold π_t)
      ┌ sample (driver orchestrates, chunk by chunk; each chunk written when done) ──────┐
      │ RolloutGroup.sample      one trajectory per prompt                                │
      │ for each step k:         prefix = prompt + steps < k of the trajectory            │
      │   RolloutGroup.sample    N candidates for step k (one prefill per prefix)         │
      │   RolloutGroup.sample    M completions of prefix + candidate (k < answer)         │
      │   Judge                  safety, utility, efficiency of each full response        │
      │   Ranking.pair           best vs worst with a margin; ties dropped                │
      │   RolloutGroup.logprobs  reference log-probs of chosen / rejected under π_t       │
      └─ erpo/iter_<t>/pairs.jsonl  (all candidates, scores, reasons, pairs) ─────────────┘
      LearnerGroup.dpo_step × ceil(epochs · pairs / batch)   (checkpoints under erpo/)
      weights: learner rank 0 ──broadcast──▶ rollout workers (version t+1)
      length control: step token budget × budget_decay, efficiency weight × efficiency_growth

A resumed run restores the newest ERPO checkpoint (iteration, step within it), reuses every
chunk and pairs file already written, and re-sends the learners' weights to the rollout
workers so they hold exactly π_t.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from safer_dist.checkpointing.checkpoint import Checkpointer, TrainerState
from safer_dist.config import Config
from safer_dist.data.chat import system_prompt, with_system_records
from safer_dist.data.records import load_records, read_jsonl
from safer_dist.erpo.ranking import Ranking
from safer_dist.reasoning.exante import STEP_CLOSE, prefix_before
from safer_dist.rollout.draw import Reseed, Seed
from safer_dist.runtime import stop
from safer_dist.runtime.faults import die_if
from safer_dist.runtime.io import atomic_write_jsonl
from safer_dist.runtime.log import get_logger
from safer_dist.runtime.metrics import MetricsWriter, Progress
from safer_dist.runtime.phases import phase
from safer_dist.train.throughput import Throughput, progress_fields

log = get_logger("erpo")


class Sampler:
    """Candidate sampling, judging and pair building for one iteration's prompts."""

    def __init__(self, cfg: Config, rollout, judge, reference=None):
        self.cfg, self.rollout, self.judge = cfg, rollout, judge
        self.reference = reference or rollout
        self.steps = cfg.erpo.step_names()

    def _sample(self, items, n, stop_strings, max_new_tokens, seed, temperature=None):
        r = self.cfg.rollout
        t = r.temperature if temperature is None else temperature
        with phase("erpo_sample"):
            return self.rollout.sample(items, n=n, stop_strings=stop_strings, max_new_tokens=max_new_tokens,
                                       temperature=t, top_p=r.top_p, seed=seed)

    def chunk(self, records: list[dict], ranking: Ranking, seed: int, iteration: int) -> list[dict]:
        e = self.cfg.erpo
        trajectories = self._sample([(r["prompt"], "") for r in records], 1, None, e.max_new_tokens, seed)
        jobs: dict[str, list[tuple[int, str]]] = {s: [] for s in self.steps}
        for i, traj in enumerate(trajectories):
            text = traj[0]["text"]
            for step in self.steps:
                try:
                    jobs[step].append((i, prefix_before(text, step)))
                except ValueError:
                    break  # the trajectory broke before this step: later prefixes do not exist
        out = []
        for k, step in enumerate(self.steps):
            if not jobs[step]:
                continue
            items = [(records[i]["prompt"], prefix) for i, prefix in jobs[step]]
            is_answer = step == "answer"
            close = STEP_CLOSE[step]
            cands = self._sample(items, e.num_candidates, [close] if close else None,
                                 e.answer_max_new_tokens if is_answer else e.step_max_new_tokens,
                                 self._candidate_seed(seed + 1 + k))
            flat = [(j, c) for j, cs in enumerate(cands) for c in cs]
            if is_answer:
                completions = [[""] for _ in flat]
            else:
                completions = self._complete([(items[j][0], items[j][1] + c["text"]) for j, c in flat], seed + 101 + k)
            scored = self._judge(records, jobs[step], flat, completions)
            out += self._pairs(records, jobs[step], step, cands, scored, ranking, iteration)
        return out

    def _candidate_seed(self, seed: int) -> Seed:
        """The candidates' seed: ``seed``, or with ``erpo.resample`` a fraction of them from another."""
        r = self.cfg.erpo.resample
        return Reseed(seed, r.fraction, hash_seed(r.seed, seed)) if r.fraction else seed

    def _complete(self, items: list[tuple[str, str]], seed: int) -> list[list[str]]:
        """Completions to the end of each (prompt, prefix + candidate). Greedy completions
        (``completion_temperature`` 0, the default) are deterministic, so each distinct item
        is completed once, whatever ``num_completions`` says: identical candidates are common
        (most rule-verification steps are), and completions are most of the sampling time."""
        e = self.cfg.erpo
        max_new = e.max_new_tokens
        if e.completion_temperature > 0:
            comp = self._sample(items, e.num_completions, None, max_new, seed, e.completion_temperature)
            return [[x["text"] for x in cs] for cs in comp]
        unique = list(dict.fromkeys(items))
        done = dict(zip(unique, (cs[0]["text"] for cs in self._sample(unique, 1, None, max_new, seed, 0.0))))
        return [[done[item]] for item in items]

    def _judge(self, records, step_jobs, flat, completions) -> list[dict]:
        items, keys = [], []
        for (j, c), comps in zip(flat, completions):
            i = step_jobs[j][0]
            for comp in comps:
                items.append((records[i], step_jobs[j][1] + c["text"] + comp, c["num_tokens"]))
                keys.append((i, items[-1][1], c["num_tokens"]))
        # Each distinct (prompt, response, length) is judged once (a model judge is costly).
        first: dict[tuple, int] = {}
        for n, key in enumerate(keys):
            first.setdefault(key, n)
        with phase("erpo_judge"):
            judged = dict(zip(first, self.judge.score_many([items[n] for n in first.values()])))
        scores = [judged[key] for key in keys]
        result, pos = [], 0
        for (j, c), comps in zip(flat, completions):
            ss = scores[pos : pos + len(comps)]
            pos += len(comps)
            result.append({
                "text": c["text"], "num_tokens": c["num_tokens"], "stopped": c["stopped"],
                "safety": sum(s.safety for s in ss) / len(ss), "utility": sum(s.utility for s in ss) / len(ss),
                "efficiency": -float(c["num_tokens"]), "reason": ss[0].reason, "valid": all(s.valid for s in ss),
            })
        return result

    def _pairs(self, records, step_jobs, step, cands, scored, ranking, iteration) -> list[dict]:
        n = self.cfg.erpo.num_candidates
        rows, ref_items = [], []
        for j, (i, prefix) in enumerate(step_jobs):
            rec = records[i]
            group = scored[j * n : (j + 1) * n]
            picked = ranking.pair(group)
            row = {
                "iteration": iteration, "prompt_id": rec.get("id"), "prompt": rec["prompt"], "step": step,
                "prefix": prefix, "candidates": group, "chosen": None, "rejected": None,
                "labels": {k: rec.get(k) for k in ("harmful", "category", "strategy", "kind")},
            }
            if picked:
                c, r, why = picked
                row.update(chosen=c, rejected=r, why=why, chosen_text=group[c]["text"], rejected_text=group[r]["text"])
                eos = step == "answer"
                ref_items += [(rec["prompt"], prefix, group[c]["text"], eos), (rec["prompt"], prefix, group[r]["text"], eos)]
            rows.append(row)
        if ref_items:
            with phase("erpo_ref_logprobs"):
                refs = self.reference.logprobs(ref_items, share_prefix=self.cfg.erpo.loss.share_prefix)
            it = iter(refs)
            for row in rows:
                if row["chosen"] is not None:
                    row["ref_chosen"], row["chosen_len"] = next(it)
                    row["ref_rejected"], row["rejected_len"] = next(it)
        return rows


def sample_iteration(cfg: Config, sampler: Sampler, pool: list[dict], iteration: int, out_dir: Path) -> Path:
    """Write ``out_dir/pairs.jsonl`` for ``iteration``; chunks already on disk are reused."""
    pairs_path = out_dir / "pairs.jsonl"
    if pairs_path.exists():
        log.info("iteration %d: pairs already sampled (%s); not sampling again", iteration, pairs_path)
        return pairs_path
    e = cfg.erpo
    prompts = list(pool)
    random.Random(f"erpo-pool-{cfg.run.seed}-{iteration}").shuffle(prompts)
    if e.prompts_per_iteration:
        prompts = prompts[: e.prompts_per_iteration]
    chunks = [prompts[i : i + e.chunk_size] for i in range(0, len(prompts), e.chunk_size)]
    ranking = cfg.erpo.ranking.at_iteration(iteration)
    rows: list[dict] = []
    progress = Progress(len(chunks), desc=f"erpo sample iter {iteration}", every=1)
    for c, chunk in enumerate(chunks):
        part = out_dir / "chunks" / f"chunk_{c:05d}.jsonl"
        if part.exists():
            rows += read_jsonl(part)
            progress.update(1)
            continue
        # One seed for the iteration, not one per chunk: a sample is a function of (run seed,
        # iteration, prompt, prefix, candidate index) only (the rollout workers key each row's
        # stream by its prefix's tokens), whatever erpo.chunk_size or rollout.num_workers.
        chunk_rows = sampler.chunk(chunk, ranking, hash_seed(cfg.run.seed, iteration), iteration)
        atomic_write_jsonl(part, chunk_rows)
        die_if(f"erpo_sample:{iteration}:{c}")
        rows += chunk_rows
        progress.update(1, pairs=sum(r["chosen"] is not None for r in rows))
        if stop.requested():
            raise stop.Preempted(f"stopped while sampling iteration {iteration} after chunk {c} (chunks kept); run the same command to resume")
    progress.close()
    atomic_write_jsonl(pairs_path, rows)
    return pairs_path


def hash_seed(*parts: int) -> int:
    return random.Random("-".join(map(str, parts))).randrange(1 << 31)


def iteration_stats(rows: list[dict]) -> dict:
    """Per-iteration sampling metrics from the pairs file."""
    cands = [c for r in rows for c in r["candidates"]]
    by_step: dict[str, list[int]] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).extend(c["num_tokens"] for c in r["candidates"])
    made = [r for r in rows if r["chosen"] is not None]
    out = {
        "prefixes": len(rows), "pairs": len(made),
        "pairs_by_reason": {k: sum(r.get("why", "").startswith(k) for r in made) for k in ("safety", "utility", "efficiency", "weighted")},
        "judge_safety": _mean(c["safety"] for c in cands), "judge_utility": _mean(c["utility"] for c in cands),
        "mean_tokens_per_step": {k: _mean(v) for k, v in by_step.items()},
        "mean_candidate_tokens": _mean(c["num_tokens"] for c in cands),
    }
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def prompt_pool(cfg: Config) -> list[dict]:
    """ERPO's prompt pool (``data.erpo_prompts``), each prompt with ``data.system_prompt``'s system
    turn when it has none: as the policy sees them in sampling, and the learners in the pairs."""
    return with_system_records(load_records(cfg.data.erpo_prompts, "prompts"), system_prompt(cfg.data))


def train_erpo(cfg: Config, learners, rollout, judge, run_dir: Path, *, reference=None) -> TrainerState:
    """Run ERPO iterations from the restored state; returns the final state.

    ``learners`` is a :class:`~safer_dist.cluster.group.LearnerGroup` set up with
    ``cfg.erpo.optim`` and ``cfg.erpo.loss``; ``rollout`` (and ``reference``, for
    ``erpo.reference=sft``) a :class:`~safer_dist.cluster.rollout.RolloutGroup` (``reference``
    with LoRA learners: :class:`~safer_dist.train.lora_reference.AdaptersOffReference`); ``judge``
    has ``score_many``. Nothing here talks to Ray.
    """
    e = cfg.erpo
    ckpt = Checkpointer(cfg.checkpoint, run_dir / "checkpoints" / "erpo", stage="erpo")
    state = TrainerState(stage="erpo", extra={"iteration": 0, "iter_step": 0})
    metrics = MetricsWriter(run_dir / "metrics.jsonl", cfg.track, run_name=cfg.run.name, config=cfg.to_dict())
    restored = ckpt.restore(learners, state, cfg)
    metrics.truncate_after("erpo", state.step)
    metrics.truncate_after("erpo_iter", state.extra["iteration"])
    with phase("weight_sync_setup"):
        learners.connect_weight_sync(rollout)
    if restored is not None:
        with phase("weight_sync"):
            learners.push_weights(rollout, state.extra["iteration"])
    pool = prompt_pool(cfg)
    sampler = Sampler(cfg, rollout, judge, reference)
    throughput = Throughput(learners.infos)
    while state.extra["iteration"] < e.iterations:
        t = state.extra["iteration"]
        it_dir = run_dir / "erpo" / f"iter_{t}"
        t0 = time.perf_counter()
        pairs_path = sample_iteration(cfg, sampler, pool, t, it_dir)
        rows = read_jsonl(pairs_path)
        stats = iteration_stats(rows)
        sample_s = time.perf_counter() - t0
        with phase("erpo_load_pairs"):
            n_pairs = learners.load_pairs(str(pairs_path), hash_seed(cfg.run.seed, t), e.safety_pair_repeats) if stats["pairs"] else 0
        steps = max(1, math.ceil(e.epochs * n_pairs / e.optim.global_batch_size)) if n_pairs else 0
        log.info("iteration %d: %d prefixes, %d pairs %s, %d with repeats -> %d DPO steps", t, stats["prefixes"], stats["pairs"],
                 stats["pairs_by_reason"], n_pairs, steps)
        train_metrics = []
        progress = Progress(steps, initial=state.extra["iter_step"], desc=f"erpo train iter {t}")
        while state.extra["iter_step"] < steps:
            s0 = time.perf_counter()
            with phase("erpo_dpo"):
                m = learners.dpo_step(state.extra["iter_step"])
            dt = time.perf_counter() - s0
            state.step += 1
            state.extra["iter_step"] += 1
            state.tokens_seen += m["num_tokens"]
            state.elapsed_s += dt
            speed = throughput(m["num_tokens"], dt)
            rec = {"stage": "erpo", "step": state.step, "iteration": t, "iter_step": state.extra["iter_step"], **m, **speed}
            metrics.write(rec)
            train_metrics.append(rec)
            progress.update(1, loss=m["loss"], acc=m["preference_accuracy"], **progress_fields(speed))
            if stop.requested():
                ckpt.save(learners, state, cfg)
                raise stop.Preempted(f"stopped at ERPO iteration {t} step {state.extra['iter_step']}; run the same command to resume")
            if ckpt.due(state.step):
                ckpt.save(learners, state, cfg)
            die_if(f"erpo_train:{t}:{state.extra['iter_step']}")
        progress.close()
        state.extra["iteration"] = t + 1
        state.extra["iter_step"] = 0
        with phase("weight_sync"):
            learners.push_weights(rollout, t + 1)
        ckpt.save(learners, state, cfg)
        metrics.write({
            "stage": "erpo_iter", "step": t + 1, "iteration": t, **stats, "sample_time_s": round(sample_s, 2),
            "dpo_steps": steps,
            "reward_margin": _mean(m["reward_margin"] for m in train_metrics),
            "preference_accuracy": _mean(m["preference_accuracy"] for m in train_metrics),
            "loss": _mean(m["loss"] for m in train_metrics),
            "step_token_budget": e.ranking.at_iteration(t).step_token_budget,
        })
    metrics.close()
    return state
