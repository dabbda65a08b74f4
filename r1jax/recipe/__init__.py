"""The DeepSeek-R1 recipe as a graph of stages in one file, run by one command.

    python -m r1jax.recipe configs/recipe/r1-tiny.yaml [key=value ...]     (make r1)

R1-Zero GRPO from the pretrained base -> cold-start chats from its correct, readable outputs ->
SFT -> reasoning GRPO -> rejection sampling plus non-reasoning chats -> SFT round 2 -> final GRPO
-> distillation into a dense student, and the same student trained by GRPO alone. Every stage
reads earlier stages' checkpoints, resumes when interrupted, and is skipped when done; the
command ends with a table of every stage's evaluation (`r1jax.eval` on the held-out built-in
tasks) and a PNG of it. The file format is `r1jax.recipe.plan`'s docstring.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from r1jax.recipe import report
from r1jax.recipe.plan import Recipe, Stage, load_recipe
from r1jax.recipe.stages import RecipeError, as_overrides, run_stage

__all__ = ["Recipe", "RecipeError", "Stage", "evaluate_stage", "load_recipe", "run"]
log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"


def evaluate_stage(recipe: Recipe, stage: Stage) -> dict:
    """`r1jax.eval` of the stage's checkpoint on the held-out built-in tasks, with the recipe's
    options; kept in run_dir/NAME/eval.json beside the fingerprint it was made for."""
    from r1jax.eval import evaluate

    directory = recipe.stage_dir(stage.name)
    options = {"data": ["builtin"], **recipe.evaluate}
    key = {"fingerprint": recipe.fingerprint(stage.name), "options": options, "set": stage.eval_set}
    path = directory / EVAL_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("recipe") == key:
            return saved
    result = evaluate(checkpoint=str(directory), out=None, overrides=as_overrides(stage.eval_set), **options)
    result["recipe"] = key
    tmp = directory / f".{EVAL_FILE}.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def run(recipe: Recipe, *, only_evaluate: bool = False) -> list[dict]:
    """Runs (or skips) every stage in order, evaluates those that are evaluated, prints the table
    and writes run_dir/recipe.png and run_dir/recipe.json. Returns the table's rows."""
    t0 = time.perf_counter()
    rows = []
    for stage in recipe.stages:
        print(f"\n== stage {stage.name} ({stage.kind})", flush=True)
        marker, ran = run_stage(recipe, stage)
        print(f"   {'finished' if ran else 'done earlier'} in {marker['wall_s']:.0f} s", flush=True)
        evaluation = evaluate_stage(recipe, stage) if stage.evaluated else None
        if evaluation is not None:
            m = evaluation["metrics"]["overall"]
            print(f"   pass@1 {m['pass@1']:.3f} ± {m['pass@1_se']:.3f}, format {m['format']:.3f}", flush=True)
        rows.append({"stage": stage.name, "kind": stage.kind, "wall_s": marker["wall_s"], "ran": ran,
                     "result": marker["result"], "evaluation": evaluation})
    png = report.plot(rows, recipe.run_dir / "recipe.png", f"R1 recipe: {Path(recipe.path).name}")
    summary = [{k: v for k, v in r.items() if k != "evaluation"} | {"metrics": report.overall_metrics(r["evaluation"])}
               for r in rows]
    (recipe.run_dir / "recipe.json").write_text(json.dumps(summary, indent=1))
    print(f"\n== {recipe.path}: every stage, evaluated on the held-out built-in tasks "
          f"(pass@1 over k samples at T {recipe.evaluate.get('temperature', 0.6)})")
    print(report.table(rows))
    goal = report.goal_line(rows, recipe.compare)
    if goal:
        print(goal)
    print(f"stages' total wall time {sum(r['wall_s'] for r in rows):.0f} s; this run {time.perf_counter() - t0:.0f} s; "
          f"picture {png}")
    return rows
