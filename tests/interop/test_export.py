"""r1jax -> HF directory (`r1jax.interop.export`): transformers' `from_pretrained` loads what is
written and gives the logits of the model it came from; config.json maps back to the same
`ModelConfig`; a failed export leaves nothing behind."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers as tf
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from r1jax import checkpoint as ckpt_lib
from r1jax.config import ModelConfig, load_model
from r1jax.interop import export as ex
from r1jax.interop import hf as hfi
from r1jax.model.decoder import Decoder
from tests.model.test_hf_parity import _build

ROOT = Path(__file__).resolve().parents[2]
IDS = np.random.default_rng(1).integers(0, 128, size=(2, 12))
SHARD = 64 * 1024  # the tiny models are 0.3 - 0.7 MB: >= 3 shards
CASES = ["dsv3_groups_qlora_yarn", "qwen2", "llama3_rope_tied"]


def _runtime(cfg: ModelConfig) -> dict:
    return {f: getattr(cfg, f) for f in ex.RUNTIME_FIELDS if hasattr(cfg, f)}


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


def _load(out: Path, **kw):
    model, info = tf.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                          output_loading_info=True, **kw)
    return model.eval(), info


@pytest.fixture(scope="module")
def built():
    """{case: (transformers model, r1jax Decoder converted from it)}."""
    out = {}
    for name in CASES:
        hf_model = _build(name)
        out[name] = hf_model, hfi.from_transformers(hf_model)
    return out


def _check_files(out: Path, max_bytes: int) -> int:
    """The index names every shard on disk and every tensor in them, with the right total; each
    shard holds at most `max_bytes` (or one larger tensor). Returns the number of shards."""
    index = json.loads((out / ex.INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    total = 0
    for file in files:
        with safetensors.safe_open(out / file, "np") as f:
            names = list(f.keys())
            sizes = [f.get_tensor(n).nbytes for n in names]
        assert {n for n, v in index["weight_map"].items() if v == file} == set(names)
        assert sum(sizes) <= max_bytes or len(names) == 1, (file, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))
    return len(files)


@pytest.mark.parametrize("name", CASES)
def test_float32_export_loads_with_the_same_logits(built, name, tmp_path):
    hf_model, model = built[name]
    out = ex.export(model, tmp_path / "hf", dtype="float32", max_shard_bytes=SHARD, progress=False)
    assert _check_files(out, SHARD) >= 3
    loaded, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded) is type(hf_model) and loaded.dtype == torch.float32
    err = np.abs(_hf_logits(loaded) - _hf_logits(hf_model)).max()
    assert err <= 1e-4, err
    # ... and it is the same config
    assert hfi.config_from_hf(json.loads((out / "config.json").read_text()), **_runtime(model.cfg)) == model.cfg


def test_bfloat16_export(built, tmp_path):
    hf_model, model = built["qwen2"]
    out = ex.export(model, tmp_path / "hf", progress=False)  # bfloat16, one file
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = _load(out)
    assert loaded.dtype == torch.bfloat16
    want = _hf_logits(hf_model)
    err = np.abs(_hf_logits(loaded) - want).max()
    assert err <= 0.05 * np.abs(want).max(), (err, np.abs(want).max())
    # A MoE model's router stays float32. Computed in bf16, routing flips swamp the comparison
    # (as for the original cast to bf16): its weights are checked in a float32 model.
    hf_model, model = built["dsv3_groups_qlora_yarn"]
    out = ex.export(model, tmp_path / "moe", progress=False)
    with safetensors.safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {n: f.get_tensor(n).dtype for n in f.keys()}
    assert dtypes["model.layers.1.mlp.gate.weight"] == dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] \
        == torch.float32
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj"] == dtypes["model.embed_tokens.weight"] == torch.bfloat16
    loaded, _ = _load(out, dtype=torch.float32)
    want = _hf_logits(hf_model)
    err = np.abs(_hf_logits(loaded) - want).max()
    assert err <= 0.05 * np.abs(want).max(), (err, np.abs(want).max())


def test_released_layout_per_expert_with_mtp(built, tmp_path):
    """Per-expert names load (transformers fuses them); the MTP layer is written but unused by it."""
    hf_model, model = built["dsv3_groups_qlora_yarn"]
    cfg = dataclasses.replace(model.cfg, num_nextn_predict_layers=1)
    params = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    for path, v in nnx.to_flat_state(abstract):
        params.setdefault(tuple(path), 0.1 * rng.standard_normal(v.shape).astype(np.float32))
    out = ex.export(hfi.build_with(cfg, params), tmp_path / "hf", dtype="float32", experts="per_expert", mtp=True,
                    max_shard_bytes=SHARD, progress=False)
    names = set(json.loads((out / ex.INDEX).read_text())["weight_map"])
    assert names == set(hfi.hf_names(cfg, experts="per_expert", mtp=True))
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.2.mlp.experts.7.up_proj.weight" in names
    loaded, info = _load(out)
    assert not info["missing_keys"]
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    assert np.abs(_hf_logits(loaded) - _hf_logits(hf_model)).max() <= 1e-4


def _random_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        noise = rng.standard_normal(shape).astype(np.float32)
        return 1 + 0.1 * noise if "norm" in path else noise / shape[-2] ** 0.5 if len(shape) >= 2 else noise

    return hfi.build_with(cfg, {tuple(p): draw(p, v.shape) for p, v in nnx.to_flat_state(abstract)})


def test_deepseek_v2_routing_exports_as_deepseek_v2(tmp_path):
    """softmax + group-limited greedy, unnormalised weights: transformers' DeepseekV2 computes the
    same; its YaRN with mscale 0.707 as in V2-Lite."""
    cfg = load_model(ROOT / "configs/model/deepseek-v2-lite.yaml", "vocab_size=128", "hidden_size=64",
                     "num_hidden_layers=2", "intermediate_size=96", "moe_intermediate_size=32",
                     "n_routed_experts=8", "num_experts_per_tok=3", "n_group=4", "topk_group=2",
                     "topk_method=group_limited_greedy", "routed_scaling_factor=1.5", "num_attention_heads=4",
                     "num_key_value_heads=4", "kv_lora_rank=32", "qk_nope_head_dim=16", "qk_rope_head_dim=16",
                     "v_head_dim=12", "rope_scaling.original_max_position_embeddings=64",
                     "max_position_embeddings=2560", "dtype=float32", "param_dtype=float32")
    model = _random_decoder(cfg)
    want = np.asarray(jax.jit(lambda m, ids: m(ids).logits)(model, jnp.asarray(IDS, jnp.int32)))
    out = ex.export(model, tmp_path / "hf", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DeepseekV2ForCausalLM"]
    loaded, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    err = np.abs(_hf_logits(loaded) - want).max()
    assert err <= 1e-4, err


def test_inexpressible_configs_are_refused():
    base = load_model(ROOT / "configs/model/deepseek-v2-lite.yaml")
    with pytest.raises(ValueError, match="norm_topk_prob"):
        ex.hf_config(dataclasses.replace(base, norm_topk_prob=True))
    with pytest.raises(ValueError, match="scoring_func=sigmoid"):
        ex.hf_config(dataclasses.replace(base, scoring_func="sigmoid"))
    with pytest.raises(ValueError, match="rotate halves"):
        ex.hf_config(load_model(ROOT / "configs/model/r1-distill-qwen-1.5b.yaml", "rope_interleave=true"))


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite", "small-moe", "tiny-moe",
                                  "r1-distill-qwen-1.5b", "r1-distill-llama-8b"])
def test_config_round_trip(name, tmp_path):
    """config_from_hf(hf_config(cfg)) == cfg, directly and through transformers' own config class."""
    cfg = load_model(ROOT / "configs/model" / f"{name}.yaml")
    hf = ex.hf_config(cfg, eos_token_id=1)
    assert hfi.config_from_hf(hf, **_runtime(cfg)) == cfg
    (tmp_path / "config.json").write_text(json.dumps(hf))
    loaded = tf.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded).__name__.removesuffix("Config") + "ForCausalLM" == hf["architectures"][0]
    assert loaded.eos_token_id == 1
    back = hfi.config_from_hf(loaded.to_dict(), **_runtime(cfg))
    if cfg.is_mla or cfg.head_dim is None:  # transformers fills in a head_dim r1jax derives
        assert back.gqa_head_dim == cfg.gqa_head_dim or cfg.is_mla
        back = dataclasses.replace(back, head_dim=cfg.head_dim)
    assert back == cfg


def test_failed_export_leaves_nothing(built, tmp_path, monkeypatch):
    model = built["qwen2"][1]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ex.export(model, out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and [p.name for p in out.iterdir()] == ["keep.txt"]

    calls, real_save = [], ex.save_file

    def failing_save(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kw)

    monkeypatch.setattr(ex, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ex.export(model, out, max_shard_bytes=SHARD, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()

    ex.export(model, out, dtype="float32", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def _tokenizer(directory: Path) -> Path:
    """A word-level tokenizer.json over 128 words, with bos / eos named in tokenizer_config.json."""
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_cli_on_r1jax_params_export(built, tmp_path, capsys):
    hf_model, model = built["dsv3_groups_qlora_yarn"]
    _, params, extra = nnx.split(model, nnx.Param, ...)
    tok = _tokenizer(tmp_path / "tok")
    meta = {"config": {"model": dataclasses.asdict(model.cfg)}, "tokenizer": str(tok / "tokenizer.json")}
    params_dir = ckpt_lib.export_params(tmp_path / "params", (params, extra), meta=meta)
    out = tmp_path / "hf"
    assert ex.main([str(params_dir), str(out), "dtype=float32", "max_shard_size=100KB"]) == 0
    assert "tensors" in capsys.readouterr().out
    assert _check_files(out, 100_000) >= 3
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert tf.AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]
    loaded, _ = _load(out)
    assert np.abs(_hf_logits(loaded) - _hf_logits(hf_model)).max() <= 1e-4
    assert ex.main([str(params_dir), str(out)]) == 1  # exists: refused
    assert "overwrite=true" in capsys.readouterr().err


def test_sharded_model_writes_the_same_files(built, tmp_path):
    """Layers of a stack spread over devices are read one at a time (a compiled slice), not via host views."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = built["dsv3_groups_qlora_yarn"][1]
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    a = ex.export(model, tmp_path / "a", dtype="float32", progress=False)
    b = ex.export(sharded, tmp_path / "b", dtype="float32", progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
