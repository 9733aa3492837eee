"""One table from a bench/device.sh results directory: each step's exit status and time, and the
headline figures of each JSON it wrote (learner rows of bench/gpu.py, sampler rows of
bench/rollout.py, the phase table of bench/gpu_run.py).

    python bench/device_summary.py bench/results/<gpu>-<date>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def lines_for(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    out = [f"{path.name}: {d.get('device', '?')}, {d.get('machine', '')}"]
    if path.name.startswith("rollout"):
        for r in d["rows"]:
            out.append(f"  {r['contestant']:<56s} {r['tokens_per_s']:>10.0f} tok/s  "
                       f"{100 * r.get('fraction_of_bound', 0):5.1f}% of the decode bound")
    elif "busy" in d:
        from gpu_run import format_table

        out += ["  " + x for x in format_table(d).splitlines()]
    else:
        for r in d["rows"]:
            if "error" in r:
                out.append(f"  {r['row']:<40s} {r['error']}")
                continue
            mfu = f"{100 * r['mfu']:5.1f}% MFU" if r.get("mfu") is not None else ""
            mem = f"{r['peak_memory_gib']:6.1f} GiB" if r.get("peak_memory_gib") is not None else ""
            out.append(f"  {r['row']:<40s} {r['tokens_per_s']:>10.0f} tok/s  {mfu}  {mem}  "
                       f"x{r.get('vs_plain', float('nan')):.2f} of plain")
    return out


def main(out_dir: str) -> None:
    root = Path(out_dir)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(f"== summary of {root}")
    if (root / "steps.txt").is_file():
        print((root / "steps.txt").read_text().rstrip())
    for path in sorted(root.glob("*.json")):
        try:
            print("\n".join(lines_for(path)))
        except (KeyError, ValueError, TypeError) as e:
            print(f"{path.name}: unreadable ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
