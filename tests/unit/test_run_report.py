"""`safer run`'s report: base, sft and erpo side by side, with the jailbreak attacks of
``eval.attacks`` on the held-out set (safer_dist/evaluation/evaluate.py ``summarize_by_attack``)."""

from __future__ import annotations

from safer_dist.evaluation.evaluate import summarize_by_attack
from safer_dist.evaluation.report import write_report


def _row(attack, harmful, success, strategy="comply"):
    return {"attack": attack, "harmful": harmful, "attack_success": success, "over_refusal": False,
            "valid": True, "strategy": strategy, "expected_strategy": None, "category": None,
            "expected_category": None, "reasoning_tokens": 10, "answer_tokens": 5, "latency_s": 0.2}


def _rows(attacked_successes: list[bool]) -> list[dict]:
    """Two harmful prompts as written (one answered, one refused), one benign, then the attacked
    copies of the two harmful ones: roleplay, roleplay, base64, base64."""
    return [_row("none", True, True), _row("none", True, False, "refuse_and_redirect"), _row("none", False, False),
            *(_row(a, True, s) for a, s in zip(("roleplay", "roleplay", "base64", "base64"), attacked_successes))]


def test_attacked_rows_stay_out_of_the_held_out_rates():
    overall, per_attack = summarize_by_attack(_rows([True, False, True, True]))
    # The rates are of the 3 prompts as written: 1 of 2 harmful answered, 1 of 2 refused.
    assert overall["num_prompts"] == 3 and overall["attack_success_rate"] == 0.5
    assert overall["harmful_refusal_rate"] == 0.5
    # Pooled over the 4 attacked copies: 3 answered.
    assert overall["jailbreak_success_rate"] == 3 / 4
    assert list(per_attack) == ["none", "roleplay", "base64"]
    assert [per_attack[a]["attack_success_rate"] for a in per_attack] == [0.5, 0.5, 1.0]
    assert [per_attack[a]["num_prompts"] for a in per_attack] == [2, 2, 2]


def test_without_attacks_there_is_no_jailbreak_rate():
    overall, per_attack = summarize_by_attack(_rows([])[:3])
    assert "jailbreak_success_rate" not in overall and list(per_attack) == ["none"]


def test_report_shows_base_sft_erpo_and_the_attacks(tmp_path):
    results = {}
    for tag, attacked in (("base", [True, True, True, True]), ("sft", [True, False, True, False]),
                          ("erpo", [False, False, False, True])):
        summary, per_attack = summarize_by_attack(_rows(attacked))
        summary["model"] = f"/models/{tag}"
        results[tag] = {"summary": summary, "sample": None, "attacks": per_attack}
    text = write_report(tmp_path, results).read_text()
    assert "| metric | base | sft | erpo |" in text
    assert "| jailbreak attack success rate | 100.0% | 50.0% | 25.0% |" in text
    assert "| roleplay | 100.0% | 50.0% | 0.0% |" in text and "| base64 | 100.0% | 50.0% | 50.0% |" in text
    assert "## Attacks" in text and "## Benchmarks" not in text
    assert "Models: base = `/models/base`, sft = `/models/sft`, erpo = `/models/erpo`" in text


def test_report_without_attacks_has_no_jailbreak_row(tmp_path):
    summary, _ = summarize_by_attack(_rows([])[:3])
    summary["model"] = "/models/sft"
    text = write_report(tmp_path, {"sft": {"summary": summary, "sample": None}}).read_text()
    assert "jailbreak" not in text and "## Attacks" not in text
    assert "| attack success rate (harmful answered) | 50.0% |" in text
