"""The recipe's closing table (every stage: wall time, evaluation) and its PNG."""

from __future__ import annotations

from pathlib import Path


def overall_metrics(evaluation: dict | None) -> dict:
    return (evaluation or {}).get("metrics", {}).get("overall", {})


def _k_key(metrics: dict, prefix: str) -> str | None:
    return next((k for k in metrics if k.startswith(prefix) and k != "pass@1" and not k.endswith("_se")), None)


def table(rows: list[dict]) -> str:
    """rows: {"stage", "kind", "wall_s", "ran", "evaluation" (r1jax.eval result or None), "result"}."""
    header = f"  {'stage':<18}{'kind':<9}{'wall':>8}  {'pass@1':>14}{'cons@k':>9}{'format':>8}{'length':>8}  note"
    lines = [header, "  " + "-" * (len(header) - 2)]
    for row in rows:
        m = overall_metrics(row["evaluation"])
        cons = _k_key(m, "cons@")
        note = "" if row["ran"] else "(done earlier)"
        if row["kind"] == "collect":
            r = row["result"]
            note = f"kept {r.get('kept')} of {r.get('samples')} samples " + note
        if row["kind"] == "grpo" and row["result"].get("first_signal_share") is not None:
            note = f"first-iteration signal {100 * row['result']['first_signal_share']:.0f}% of groups " + note
        score = f"{m['pass@1']:.3f} ± {m['pass@1_se']:.3f}" if m else "-"
        lines.append(f"  {row['stage']:<18}{row['kind']:<9}{row['wall_s']:>7.0f}s  {score:>14}"
                     f"{m.get(cons, float('nan')) if m else float('nan'):>9.3f}{m.get('format', float('nan')):>8.3f}"
                     f"{m.get('mean_length', float('nan')):>8.1f}  {note}".replace("nan", "  -"))
    return "\n".join(lines)


def goal_line(rows: list[dict], compare: dict) -> str | None:
    """The paper's claim, checked: the distilled student's pass@1 against the teacher's (goal
    >= 0.8x) and against the same student trained by RL alone."""
    by_name = {r["stage"]: overall_metrics(r["evaluation"]) for r in rows}
    teacher, distilled, rl_only = (by_name.get(compare.get(k)) for k in ("teacher", "distilled", "rl_only"))
    if not (teacher and distilled):
        return None
    ratio = distilled["pass@1"] / max(teacher["pass@1"], 1e-9)
    line = (f"distilled student pass@1 {distilled['pass@1']:.3f} = {ratio:.2f} x the teacher's {teacher['pass@1']:.3f} "
            f"(goal >= 0.8: {'met' if ratio >= 0.8 else 'not met'})")
    if rl_only:
        better = distilled["pass@1"] > rl_only["pass@1"]
        line += (f"; RL-only student {rl_only['pass@1']:.3f}: distillation "
                 f"{'beats' if better else 'does not beat'} RL on the small model")
    return line


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Bars of pass@1 (with its standard error) and cons@k per evaluated stage."""
    evaluated = [(r["stage"], overall_metrics(r["evaluation"])) for r in rows if overall_metrics(r["evaluation"])]
    if not evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n, _ in evaluated]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    ax.bar(x - 0.2, [m["pass@1"] for _, m in evaluated], 0.4, yerr=[m["pass@1_se"] for _, m in evaluated],
           label="pass@1", capsize=3)
    ax.bar(x + 0.2, [m.get(_k_key(m, "cons@") or "", 0.0) for _, m in evaluated], 0.4, label="cons@k")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
