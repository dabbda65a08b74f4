"""Running one stage of a recipe: its run config, its job, and the marker that it is done.

A stage is done when `run_dir/NAME/recipe_stage.json` holds its current fingerprint; a stage
without one runs, and its job resumes from its own checkpoints (train, GRPO, distillation) or
starts over (collect writes to a temporary file, renamed when complete). A done marker with a
different fingerprint means the recipe changed above it: that is an error, never a silent rerun
over finished work.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from r1jax import config as config_lib
from r1jax.config import Config
from r1jax.data.tasks import corpus
from r1jax.recipe.plan import Recipe, Stage

MARKER = "recipe_stage.json"
CHATS = "chats.jsonl"


class RecipeError(RuntimeError):
    """A stage cannot run or produced nothing usable; the message names the stage."""


def as_overrides(values: dict) -> list[str]:
    """{"a.b": value} -> ["a.b=<value as JSON>"]: JSON is YAML, so strings with braces or colons
    (a prompt template) come back as strings."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def stage_config(recipe: Recipe, stage: Stage, **values) -> Config:
    """The run config of a train / grpo / distill stage: its config file, then the recipe's
    `set`, the stage's `set`, and what the graph decides (run_dir, init_from, tokenizer)."""
    spec = stage.spec
    merged = {**recipe.common, **spec.get("set", {}), **values, "run_dir": str(recipe.stage_dir(stage.name))}
    if "from" in spec:
        merged["init_from"] = str(recipe.stage_dir(spec["from"]))
    if recipe.tokenizer_from and recipe.tokenizer_from != stage.name:
        merged["data.tokenizer"] = str(recipe.stage_dir(recipe.tokenizer_from))
    try:
        return config_lib.load(spec["config"], *as_overrides(merged))
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"stages.{stage.name}.set.{e.key}" if e.key else f"stages.{stage.name}",
                                     str(e).split(": ", 1)[-1]) from None


def read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(directory: Path, content: dict) -> None:
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, directory / MARKER)


def _write_sft_data(recipe: Recipe, stage: Stage, directory: Path, tasks: dict) -> Path:
    """One file of SFT chats: the stage's collect stages' chats, `builtin_chats` built-in reference
    traces of `tasks` (`datasets.task_options`), and `non_reasoning` built-in chats."""
    out = directory / "data.jsonl"
    tmp = directory / ".data.jsonl.tmp"
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for source in stage.spec.get("data", []):
            for line in (recipe.stage_dir(source) / CHATS).read_text().splitlines():
                if line.strip():
                    f.write(line + "\n")
                    count += 1
        for record in corpus.sft_records(int(stage.spec.get("builtin_chats", 0)), seed=1, **tasks):
            f.write(json.dumps(record) + "\n")
            count += 1
        for record in corpus.non_reasoning_records(int(stage.spec.get("non_reasoning", 0)), seed=0):
            f.write(json.dumps(record) + "\n")
            count += 1
    if not count:
        raise RecipeError(f"stage {stage.name}: its data stages {stage.spec.get('data')} hold no chats")
    os.replace(tmp, out)
    return out


def run_train(recipe: Recipe, stage: Stage, directory: Path) -> dict:
    from r1jax.train.loop import train

    from r1jax.data.datasets import task_options

    cfg = stage_config(recipe, stage)
    if any(stage.spec.get(k) for k in ("data", "builtin_chats", "non_reasoning")):
        path = _write_sft_data(recipe, stage, directory, task_options(cfg))
        cfg = stage_config(recipe, stage, **{"data.source": str(path), "data.format": "chat"})
    summary = train(cfg)
    return {"final_loss": summary.final_loss, "steps": summary.steps}


def run_grpo(recipe: Recipe, stage: Stage, directory: Path) -> dict:
    from r1jax.train.grpo import GrpoTrainer, NoSignalError

    try:
        result = GrpoTrainer(stage_config(recipe, stage)).train()
    except NoSignalError as e:
        raise RecipeError(f"stage {stage.name}: {e}") from None
    return {"first_signal_share": result["first_signal_share"], "rollout_s": result["rollout_s"],
            "update_s": result["update_s"]}


def run_collect(recipe: Recipe, stage: Stage, directory: Path) -> dict:
    from r1jax.train.rejection import collect

    spec = stage.spec
    options = {k: spec[k] for k in ("k", "prompts", "temperature", "top_p", "max_tokens", "max_per_prompt", "keep_truncated")
               if k in spec}
    tmp = directory / f".{CHATS}.tmp"
    stats = collect(recipe.stage_dir(spec["from"]), tmp, thresholds=spec.get("min"), **options)
    if not stats["kept"]:
        raise RecipeError(f"stage {stage.name}: kept none of {stats.get('samples', '?')} samples from "
                          f"{spec['from']} (thresholds {spec.get('min') or 'accuracy and format 1'})")
    os.replace(tmp, directory / CHATS)
    return {"kept": stats["kept"], "samples": stats.get("samples"), "prompts_with_kept": stats.get("prompts_with_kept")}


def run_distill(recipe: Recipe, stage: Stage, directory: Path) -> dict:
    from r1jax.train.distill import distill

    cfg = stage_config(recipe, stage, **{"distill.teacher": str(recipe.stage_dir(stage.spec["teacher"]))})
    result = distill(cfg)
    return {k: v for k, v in (vars(result) if hasattr(result, "__dict__") else dict(result)).items()
            if isinstance(v, (int, float, str)) or v is None}


RUNNERS = {"train": run_train, "grpo": run_grpo, "collect": run_collect, "distill": run_distill}


def run_stage(recipe: Recipe, stage: Stage) -> tuple[dict, bool]:
    """(its marker, whether it ran now). Skips a stage whose marker is current."""
    directory = recipe.stage_dir(stage.name)
    fingerprint = recipe.fingerprint(stage.name)
    marker = read_marker(directory)
    if marker is not None:
        if marker.get("fingerprint") != fingerprint:
            raise RecipeError(f"stage {stage.name} in {directory} was finished with another recipe (its stage or an "
                              f"earlier one changed since): delete {directory} to run it again")
        return marker, False
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = RUNNERS[stage.kind](recipe, stage, directory)
    marker = {"fingerprint": fingerprint, "kind": stage.kind, "wall_s": time.perf_counter() - t0, "result": result,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_marker(directory, marker)
    return marker, True
