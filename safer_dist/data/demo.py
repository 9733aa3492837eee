"""Deterministic, seeded demo data: SFT traces, an ERPO prompt pool and a held-out eval set.

The content tables (templates, fillers, answer sentences) are in ``demo_content.py``; this
module splits, samples and renders them. Design (see docs/design.md §7 and docs/format.md):

- Every request is ``prefix + template.format(x=filler) + suffix``. Harmful, benign and
  benign *look-alike* requests share the SAME 45 phrasing templates, so a model has to read the
  content words (the filler) to decide; look-alikes borrow a risk category's vocabulary
  ("kill a Python process that hangs", "exploit a bug bounty on my own app") but fall under its
  ``allowed`` carve-outs. Per category, the 36 harmful fillers are every combination of 6
  actions and 6 targets that belong to that category alone, so a held-out harmful phrase is a
  new combination of words seen in training for its category (with seed 0 every one is: both
  its action and its target occur in training phrases; other seeds may hold out all six
  phrases of an action or target now and then); 10 look-alike fillers per
  category and 12 benign fillers per domain.
- Three-way split of the templates and of every filler group (per category and kind; per
  benign domain): 60% train (SFT), 15% ERPO-only, 25% eval (at least one each). The ERPO pool
  takes half its prompts from the train material and half from the ERPO-only material; the
  eval set uses only eval templates and eval fillers, disjoint from both.
- Mix: about 45% harmful, 30% benign, 25% look-alike. Harmful content stays abstract: fillers
  are short request phrases, refusals redirect to safe resources, and compliant answers are
  short and generic.
- SFT traces carry deliberate, labelled flaws for preference optimisation to fix: redundant
  sentences in the reasoning (``"verbose"``, the majority: 80%, so a greedy SFT model is verbose
  and length control has something to remove) and a wrong strategy with a matching answer
  (``"wrong_strategy"``, 6%). Every SFT response stays format-valid.

Same seed and arguments -> byte-identical files. Each file draws from its own RNG stream, so
e.g. ``num_sft`` does not change the eval set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from safer_dist.reasoning import exante
from safer_dist.data.demo_content import (  # noqa: F401  (tests read the tables from here too)
    BENIGN, BENIGN_RULES, CALIBRATIONS, CLOSINGS, DOMAIN_TIPS, HARMFUL, HARMFUL_PARTS, INTENTS, LOOKALIKE,
    PREFIX_WEIGHTS, PREFIXES, REDIRECTS, REFUSALS, SAFEGUARDED, SOFT_COMPLY, SUFFIX_WEIGHTS, SUFFIXES, TEMPLATES, VERBOSE,
)
from safer_dist.data.records import write_jsonl
from safer_dist.reasoning.rules import Category, Rulebook

KINDS = ("harmful", "benign", "lookalike")


@dataclass(frozen=True)
class DemoSplit:
    """Which templates and fillers each file may use. ``train_*`` feed SFT and half of the ERPO
    pool, ``erpo_*`` only the other half of the ERPO pool, ``eval_*`` only the eval set; the three
    are disjoint. ``*_fillers`` map a group ``(kind, category name or domain)`` to its items
    (strings for harmful/benign, ``(filler, reason, domain)`` tuples for look-alikes)."""

    train_templates: tuple[str, ...]
    erpo_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    train_fillers: dict[tuple[str, str], tuple]
    erpo_fillers: dict[tuple[str, str], tuple]
    eval_fillers: dict[tuple[str, str], tuple]


def demo_split(rulebook: Rulebook, seed: int = 0, erpo_frac: float = 0.15, eval_frac: float = 0.25) -> DemoSplit:
    """Split the templates and every filler group three ways: ``eval_frac`` for the eval set,
    ``erpo_frac`` for ERPO only, the rest for training (at least one item each). Only categories
    whose name has demo content are used."""
    rng = random.Random(f"safer-demo-split-{seed}")
    groups: dict[tuple[str, str], tuple] = {}
    for cat in _demo_categories(rulebook):
        groups[("harmful", cat.name)] = HARMFUL[cat.name]
        groups[("lookalike", cat.name)] = LOOKALIKE[cat.name]
    for domain, fillers in BENIGN.items():
        groups[("benign", domain)] = fillers
    templates = _split3(TEMPLATES, rng, erpo_frac, eval_frac)
    train, erpo, held = {}, {}, {}
    for key, items in groups.items():
        train[key], erpo[key], held[key] = _split3(items, rng, erpo_frac, eval_frac)
    return DemoSplit(*templates, train, erpo, held)


def build_demo(rulebook: Rulebook, seed: int = 0, num_sft: int = 4000, num_erpo: int = 256,
               num_eval: int = 300, *, verbose_rate: float = 0.8, wrong_strategy_rate: float = 0.06,
               harmful_frac: float = 0.45, lookalike_frac: float = 0.25,
               erpo_frac: float = 0.15, eval_frac: float = 0.25) -> dict[str, list[dict]]:
    """The three record lists (``sft``, ``erpo_prompts``, ``eval``) without writing files."""
    for name, value in (("verbose_rate", verbose_rate), ("wrong_strategy_rate", wrong_strategy_rate),
                        ("harmful_frac", harmful_frac), ("lookalike_frac", lookalike_frac),
                        ("erpo_frac", erpo_frac), ("eval_frac", eval_frac)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if harmful_frac + lookalike_frac > 1.0:
        raise ValueError(f"harmful_frac + lookalike_frac must be <= 1, got {harmful_frac + lookalike_frac}")
    if erpo_frac + eval_frac >= 1.0:
        raise ValueError(f"erpo_frac + eval_frac must be < 1, got {erpo_frac + eval_frac}")
    split = demo_split(rulebook, seed, erpo_frac, eval_frac)
    by_name = {c.name: c for c in _demo_categories(rulebook)}
    mix = (harmful_frac, lookalike_frac)
    train = (split.train_templates, split.train_fillers)
    seen: set[str] = set()  # ERPO prompts avoid exact SFT prompts
    specs = {
        "sft": _sample(num_sft, random.Random(f"safer-demo-sft-{seed}"), [train], mix, seen),
        # half from the SFT material (familiar prompts, new combinations), half from ERPO-only material
        "erpo_prompts": _sample(num_erpo, random.Random(f"safer-demo-erpo-{seed}"),
                                [train, (split.erpo_templates, split.erpo_fillers)], mix, seen),
        "eval": _sample(num_eval, random.Random(f"safer-demo-eval-{seed}"),
                        [(split.eval_templates, split.eval_fillers)], mix, set()),
    }
    out = {}
    for name, file_specs in specs.items():
        out[name] = [_label(f"{name.split('_')[0]}-{i:05d}", spec, by_name) for i, spec in enumerate(file_specs)]

    rng = random.Random(f"safer-demo-flaws-{seed}")
    sft = out["sft"]
    eligible = [i for i, r in enumerate(sft) if r["kind"] != "benign"]
    wrong = set(rng.sample(eligible, min(len(eligible), round(wrong_strategy_rate * len(sft)))))
    verbose = set(rng.sample(range(len(sft)), round(verbose_rate * len(sft))))
    for i, (record, spec) in enumerate(zip(sft, specs["sft"])):
        flaws = (["verbose"] if i in verbose else []) + (["wrong_strategy"] if i in wrong else [])
        record["response"] = exante.render(_trace(record, spec, by_name, flaws, rng))
        record["flaws"] = flaws
    return out


def generate_demo(out_dir: str | Path, rulebook: Rulebook | str | Path, seed: int = 0, num_sft: int = 4000,
                  num_erpo: int = 256, num_eval: int = 300, **rates: float) -> dict[str, Path]:
    """Write ``sft.jsonl``, ``erpo_prompts.jsonl`` and ``eval.jsonl`` under ``out_dir`` and
    return their paths keyed by stem. ``rates`` go to ``build_demo`` (flaw rates, mix)."""
    if not isinstance(rulebook, Rulebook):
        rulebook = Rulebook.load(rulebook)
    data = build_demo(rulebook, seed, num_sft, num_erpo, num_eval, **rates)
    return {name: write_jsonl(Path(out_dir) / f"{name}.jsonl", records) for name, records in data.items()}


# --- internals -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    kind: str
    group: str          # category name (harmful, look-alike) or benign domain
    filler: str
    reason: str         # look-alike carve-out, else ""
    domain: str         # answer domain for compliant answers


def _demo_categories(rulebook: Rulebook) -> list[Category]:
    cats = [c for c in rulebook.categories if c.name in HARMFUL and c.name in LOOKALIKE]
    if not cats:
        raise ValueError(
            f"{rulebook.source}: no category has demo content; demo data knows the names "
            f"{', '.join(HARMFUL)}"
        )
    return cats


def _split3(items: tuple, rng: random.Random, erpo_frac: float, eval_frac: float) -> tuple[tuple, tuple, tuple]:
    """(train, erpo-only, eval) parts of ``items``, each at least one item."""
    if len(items) < 3:
        raise ValueError(f"cannot split fewer than 3 items three ways: {items}")
    shuffled = list(items)
    rng.shuffle(shuffled)
    n_eval = max(1, round(eval_frac * len(items)))
    n_erpo = max(1, round(erpo_frac * len(items)))
    n_eval = min(n_eval, len(items) - 2)
    n_erpo = min(n_erpo, len(items) - 1 - n_eval)
    return (tuple(shuffled[n_eval + n_erpo:]), tuple(shuffled[n_eval: n_eval + n_erpo]),
            tuple(shuffled[:n_eval]))


def _sample(n: int, rng: random.Random, sources: list[tuple[tuple[str, ...], dict[tuple[str, str], tuple]]],
            mix: tuple[float, float], seen: set[str]) -> list[tuple[str, _Spec]]:
    """``n`` (prompt, spec) pairs with exact kind counts, in shuffled order, avoiding repeated
    prompts where a few redraws allow it. Each prompt takes its template AND filler from one
    ``(templates, pools)`` source; the sources share every kind's count equally (to within one)."""
    n_harmful, n_lookalike = round(mix[0] * n), round(mix[1] * n)
    counts = {"harmful": n_harmful, "lookalike": n_lookalike, "benign": n - n_harmful - n_lookalike}
    slots, turn = [], 0
    for kind in KINDS:  # kind by kind, source by source, so each source gets an equal share
        for _ in range(counts[kind]):
            slots.append((kind, turn % len(sources)))
            turn += 1
    rng.shuffle(slots)
    out = []
    for kind, source in slots:
        templates, pools = sources[source]
        groups = [key for key in pools if key[0] == kind]
        for _attempt in range(20):
            _, group = rng.choice(groups)
            item = rng.choice(pools[(kind, group)])
            if kind == "lookalike":
                spec = _Spec(kind, group, item[0], item[1], item[2])
            else:
                spec = _Spec(kind, group, item, "", group if kind == "benign" else "general")
            prompt = (rng.choices(PREFIXES, PREFIX_WEIGHTS)[0] + rng.choice(templates).format(x=spec.filler)
                      + rng.choices(SUFFIXES, SUFFIX_WEIGHTS)[0])
            if prompt not in seen:
                break
        seen.add(prompt)
        out.append((prompt, spec))
    return out


def _label(rid: str, pair: tuple[str, _Spec], by_name: dict[str, Category]) -> dict:
    prompt, spec = pair
    if spec.kind == "harmful":
        cat = by_name[spec.group]
        category, strategy, related = cat.id, cat.default_strategy, cat.id
    else:
        category, strategy = "none", "comply"
        related = by_name[spec.group].id if spec.kind == "lookalike" else "none"
    return {"id": rid, "prompt": prompt, "harmful": spec.kind == "harmful", "category": category,
            "strategy": strategy, "kind": spec.kind, "related_category": related}


def _trace(record: dict, pair: tuple[str, _Spec], by_name: dict[str, Category], flaws: list[str],
           rng: random.Random) -> exante.Trace:
    _, spec = pair
    x = spec.filler
    strategy = record["strategy"]
    if "wrong_strategy" in flaws:
        if spec.kind == "lookalike":
            strategy = "refuse_and_redirect"
        elif strategy == "refuse_and_redirect":
            strategy = "comply_with_safeguards"
        else:  # a harmful request whose right answer already has safeguards: drop them
            strategy = "comply"

    assessment = f"Intent: {rng.choice(INTENTS).format(x=x)}. Risk category: {record['category']}."
    if spec.kind == "harmful":
        cat = by_name[spec.group]
        cites = " and ".join(f"[{r.id}]" for r in cat.rules)
        rules = f"The request falls under {cat.name}: {cites}; verdict: violated."
    elif spec.kind == "lookalike":
        cat = by_name[spec.group]
        rules = (f"It resembles {cat.name} [{cat.rules[0].id}], but {spec.reason} is allowed; "
                 f"verdict: not violated.")
    else:
        rules = rng.choice(BENIGN_RULES)
    calibration = f"Strategy: {strategy}. {rng.choice(CALIBRATIONS[strategy])}"

    if "verbose" in flaws:  # 2-4 sentences: the first in the assessment, the second in the
        # calibration (so both steps are verbose in 80% of traces), any others in either
        for j, sentence in enumerate(rng.sample(VERBOSE, rng.randint(2, 4))):
            if j == 0 or (j > 1 and rng.random() < 0.5):
                assessment += " " + sentence
            else:
                calibration += " " + sentence

    if strategy == "refuse_and_redirect":
        redirect = REDIRECTS.get(spec.group, "I am glad to help with a safer, related question instead.")
        answer = f"{rng.choice(REFUSALS)} {redirect}"
    elif strategy == "comply_with_safeguards":
        answer = rng.choice(SAFEGUARDED if spec.kind == "harmful" and record["strategy"] == strategy
                            else SOFT_COMPLY)
    else:
        answer = f"Sure. To {x}, {DOMAIN_TIPS[spec.domain]} {rng.choice(CLOSINGS)}"
    return exante.Trace(assessment, rules, calibration, answer)
