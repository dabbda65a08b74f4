"""Recipe files: every mistake is a ConfigError naming its key; fingerprints follow the graph."""

import pytest
import yaml

from r1jax.config import ConfigError
from r1jax.recipe import load_recipe

GOOD = {
    "run_dir": "runs/x",
    "tokenizer_from": "base",
    "stages": {
        "base": {"kind": "train", "config": "configs/tiny-pretrain.yaml"},
        "zero": {"kind": "grpo", "config": "configs/tiny-grpo.yaml", "from": "base"},
        "chats": {"kind": "collect", "from": "zero", "k": 2},
        "sft": {"kind": "train", "config": "configs/tiny-sft.yaml", "from": "base", "data": ["chats"]},
        "other": {"kind": "train", "config": "configs/tiny-sft.yaml", "from": "base"},
    },
}


def _write(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d["stages"]["zero"].update(kind="ppo"), "stages.zero.kind"),
    (lambda d: d["stages"]["zero"].update(k=3), "stages.zero.k"),  # a collect option on a grpo stage
    (lambda d: d["stages"]["zero"].update({"from": "sft"}), "stages.zero.from"),  # a later stage
    (lambda d: d["stages"]["sft"].update(data=["zero"]), "stages.sft.data"),  # not a collect stage
    (lambda d: d["stages"]["base"].update(config="configs/nope.yaml"), "stages.base.config"),
    (lambda d: d["stages"]["chats"].pop("from"), "stages.chats.from"),
    (lambda d: d.update(tokenizer_from="nobody"), "tokenizer_from"),
    (lambda d: d.update(compare={"teacher": "nobody"}), "compare.teacher"),
])
def test_mistakes_name_their_key(tmp_path, change, key):
    data = yaml.safe_load(yaml.safe_dump(GOOD, sort_keys=False))
    change(data)
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, data))
    assert e.value.key == key


def test_a_changed_stage_changes_its_fingerprint_and_those_after_it_only(tmp_path):
    before = load_recipe(_write(tmp_path, GOOD))
    after = load_recipe(_write(tmp_path, GOOD), "stages.zero.set={steps: 3}")
    same = {n for n in ("base", "zero", "chats", "sft", "other") if before.fingerprint(n) == after.fingerprint(n)}
    assert same == {"base", "other"}
    assert load_recipe(_write(tmp_path, GOOD), "run_dir=elsewhere").run_dir.name == "elsewhere"
