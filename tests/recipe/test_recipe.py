"""configs/recipe/r1-mini.yaml end to end: every stage runs, a re-run skips them all, a removed
stage runs again alone, and a changed stage is refused rather than run over finished work."""

import json

import pytest

from r1jax.recipe import RecipeError, load_recipe, run

MINI = "configs/recipe/r1-mini.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("r1-mini")
    recipe = load_recipe(MINI, f"run_dir={run_dir}")
    return recipe, run(recipe)


def test_every_stage_runs_and_is_evaluated_as_configured(finished, capsys):
    recipe, rows = finished
    assert [r["stage"] for r in rows] == [s.name for s in recipe.stages]
    assert all(r["ran"] for r in rows)
    for row, stage in zip(rows, recipe.stages):
        assert (row["evaluation"] is not None) == stage.evaluated
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
