"""configs/recipe/r1-mini.yaml end to end: every stage runs, a re-run skips them all, a removed
stage runs again alone, and a changed stage is refused rather than run over finished work."""

import json
import os
import re
import subprocess
import sys

import pytest

from r1jax.recipe import RecipeError, load_recipe, run

MINI = "configs/recipe/r1-mini.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The recipe's CLI in a process of its own with one device: the graph is under test here, not
    sharding (that is tests/parallel/), and one device compiles its eleven stages in about half the
    time eight do. Returns the recipe and the rows of its run_dir/recipe.json."""
    run_dir = tmp_path_factory.mktemp("r1-mini")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = os.environ | {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "r1jax.recipe", MINI, f"run_dir={run_dir}"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recipe = load_recipe(MINI, f"run_dir={run_dir}")
    return recipe, json.loads((run_dir / "recipe.json").read_text())


def test_every_stage_runs_and_is_evaluated_as_configured(finished):
    recipe, rows = finished
    assert [r["stage"] for r in rows] == [s.name for s in recipe.stages]
    assert all(r["ran"] for r in rows)
    for row, stage in zip(rows, recipe.stages):
        assert bool(row["metrics"]) == stage.evaluated
        marker = json.loads((recipe.stage_dir(stage.name) / "recipe_stage.json").read_text())
        assert marker["fingerprint"] == recipe.fingerprint(stage.name)
    for name in ("cold-start-data", "rejection"):  # collect stages wrote chats the next SFT read
        chats = (recipe.stage_dir(name) / "chats.jsonl").read_text().splitlines()
        assert len(chats) == rows[[r["stage"] for r in rows].index(name)]["result"]["kept"] > 0
    sft_data = (recipe.stage_dir("sft-2") / "data.jsonl").read_text().splitlines()
    assert sum('"task": "chat"' in line for line in sft_data) == 2  # non_reasoning: 2
    for name in ("base", "cold-start-sft", "final-rl", "distill", "student-rl"):  # each stage's exported params
        assert (recipe.stage_dir(name) / "params").is_dir()
    assert (recipe.run_dir / "recipe.png").stat().st_size > 0
    summary = json.loads((recipe.run_dir / "recipe.json").read_text())
    assert {s["stage"] for s in summary if s["metrics"]} == {"final-rl", "distill", "student-rl"}


def test_rerun_skips_finished_stages_and_reruns_only_a_removed_one(finished, capsys):
    recipe, _ = finished
    import shutil

    shutil.rmtree(recipe.stage_dir("student-rl"))
    capsys.readouterr()
    rows = run(recipe)
    assert [r["stage"] for r in rows if r["ran"]] == ["student-rl"]
    out = capsys.readouterr().out
    assert "distilled student pass@1" in out and out.count("(done earlier)") == len(rows) - 1


def test_a_changed_stage_is_refused_not_rerun_over_finished_work(finished):
    recipe, _ = finished
    changed = load_recipe(MINI, f"run_dir={recipe.run_dir}", "stages.r1-zero.set.steps=2")
    with pytest.raises(RecipeError, match="stage r1-zero .* was finished with another recipe"):
        run(changed)
