"""A recipe file: named stages in order, each a kind of job reading earlier stages' outputs.

    run_dir: runs/r1-tiny            # stage NAME runs in run_dir/NAME
    tokenizer_from: base             # every later stage uses this stage's tokenizer
    set: {data.tasks: [arithmetic]}  # run-config overrides for every train / grpo / distill stage
    evaluate: {prompts: 128, k: 4}   # r1jax.eval options for every evaluated stage
    compare: {teacher: final-rl, distilled: distill, rl_only: student-rl}
    stages:
      base:   {kind: train, config: configs/tiny-pretrain.yaml}
      zero:   {kind: grpo, config: configs/tiny-grpo.yaml, from: base, set: {steps: 20}}
      chats:  {kind: collect, from: zero, k: 8, prompts: 256, min: {accuracy: 1, format: 1}}
      sft:    {kind: train, config: configs/tiny-sft.yaml, from: base, data: [chats], non_reasoning: 100}
      ...

Kinds: `train` (pretrain / SFT by its config's mode; its data, when given: the chats of the
collect stages in `data`, `builtin_chats` built-in reference traces and `non_reasoning` built-in
chats), `grpo`, `collect` (rejection sampling from `from`), `distill` (`teacher` stage into the
student started from `from`). `from` sets a stage's init_from. `evaluate: false` skips a stage's
evaluation; a mapping gives it run-config overrides for evaluation (e.g. the prompt template a
base model is asked in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
import yaml

from r1jax.config import ConfigError

KINDS = ("train", "grpo", "collect", "distill")
STAGE_KEYS = {
    "train": {"kind", "config", "from", "set", "data", "builtin_chats", "non_reasoning", "evaluate"},
    "grpo": {"kind", "config", "from", "set", "evaluate"},
    "collect": {"kind", "from", "k", "prompts", "min", "temperature", "top_p", "max_tokens", "max_per_prompt", "keep_truncated",
                "evaluate"},
    "distill": {"kind", "config", "from", "teacher", "set", "evaluate"},
}
RECIPE_KEYS = {"run_dir", "tokenizer_from", "set", "evaluate", "compare", "stages", "student"}  # student: for anchors
COMPARE_KEYS = {"teacher", "distilled", "rl_only"}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    spec: dict  # the stage's mapping as written

    @property
    def parents(self) -> list[str]:
        names = [self.spec.get("from"), self.spec.get("teacher"), *self.spec.get("data", ())]
        return [n for n in names if n]

    @property
    def evaluated(self) -> bool:
        return self.spec.get("evaluate", self.kind != "collect") is not False

    @property
    def eval_set(self) -> dict:
        value = self.spec.get("evaluate")
        return value if isinstance(value, dict) else {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: str
    run_dir: Path
    stages: tuple[Stage, ...]
    tokenizer_from: str | None
    common: dict  # `set`
    evaluate: dict
    compare: dict

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def fingerprint(self, name: str) -> str:
        """A hash of what the stage's output depends on: its spec, the common overrides, and its
        parents' fingerprints (a changed upstream stage changes every stage after it)."""
        stage = self.stage(name)
        spec = {k: v for k, v in stage.spec.items() if k != "evaluate"}
        parts = {"spec": spec, "set": self.common, "parents": [self.fingerprint(p) for p in stage.parents],
                 "tokenizer": self.fingerprint(self.tokenizer_from) if self.tokenizer_from not in (None, name)
                 and self._before(self.tokenizer_from, name) else None}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _before(self, a: str, b: str) -> bool:
        names = [s.name for s in self.stages]
        return names.index(a) < names.index(b)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def load_recipe(path: str | Path, *overrides: str) -> Recipe:
    """Reads and checks a recipe file; `overrides` are `key=value` for its top-level keys
    (run_dir=..., or evaluate.prompts=...). Errors are ConfigErrors naming the key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError("", f"recipe file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: invalid YAML: {e}") from None
    _require(isinstance(data, dict), "", f"{path}: top level must be a mapping")
    for item in overrides:
        key, eq, raw = item.partition("=")
        _require(bool(eq), item, "override must look like key=value")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), key, "is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    for key in data:
        _require(key in RECIPE_KEYS, key, f"unknown key (known: {', '.join(sorted(RECIPE_KEYS))})")
    stages_data = data.get("stages")
    _require(isinstance(stages_data, dict) and bool(stages_data), "stages", "must be a non-empty mapping of stages")
    stages, seen = [], set()
    for name, spec in stages_data.items():
        key = f"stages.{name}"
        _require(isinstance(spec, dict), key, "must be a mapping")
        kind = spec.get("kind")
        _require(kind in KINDS, f"{key}.kind", f"must be one of {list(KINDS)}, got {kind!r}")
        for k in spec:
            _require(k in STAGE_KEYS[kind], f"{key}.{k}", f"unknown key for a {kind} stage "
                                                          f"(known: {', '.join(sorted(STAGE_KEYS[kind]))})")
        if kind != "collect":
            _require("config" in spec, f"{key}.config", "required for a train / grpo / distill stage")
            _require(Path(spec["config"]).is_file(), f"{key}.config", f"{spec['config']} does not exist")
        if kind in ("grpo", "collect", "distill"):
            _require("from" in spec, f"{key}.from", f"a {kind} stage starts from an earlier stage")
        if kind == "distill":
            _require("teacher" in spec, f"{key}.teacher", "names the teacher stage")
        _require(isinstance(spec.get("set", {}), dict), f"{key}.set", "must be a mapping of run-config keys")
        _require(isinstance(spec.get("data", []), list), f"{key}.data", "must be a list of collect stages")
        for ref_key in ("from", "teacher"):
            if ref_key in spec:
                _require(spec[ref_key] in seen, f"{key}.{ref_key}",
                         f"{spec[ref_key]!r} is not an earlier stage (earlier: {sorted(seen) or 'none'})")
        for source in spec.get("data", []):
            _require(source in seen and stages_data[source].get("kind") == "collect", f"{key}.data",
                     f"{source!r} is not an earlier collect stage")
        seen.add(name)
        stages.append(Stage(name, kind, spec))
    tokenizer_from = data.get("tokenizer_from")
    _require(tokenizer_from is None or tokenizer_from in seen, "tokenizer_from", f"{tokenizer_from!r} is not a stage")
    compare = data.get("compare") or {}
    for k, v in compare.items():
        _require(k in COMPARE_KEYS, f"compare.{k}", f"unknown key (known: {', '.join(sorted(COMPARE_KEYS))})")
        _require(v in seen, f"compare.{k}", f"{v!r} is not a stage")
    return Recipe(path=str(path), run_dir=Path(data.get("run_dir", "runs/recipe")), stages=tuple(stages),
                  tokenizer_from=tokenizer_from, common=dict(data.get("set") or {}),
                  evaluate=dict(data.get("evaluate") or {}), compare=dict(compare))

