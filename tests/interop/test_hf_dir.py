"""HF model directories -> r1jax (`r1jax.interop.hf_dir`): transformers' layout and the released V3
layout (per-expert, FP8 with partial edge blocks, MTP), against transformers on the same weights,
on meshes against one device, and every bad input named."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from r1jax.config import MeshConfig
from r1jax.interop import hf_dir
from r1jax.interop.safetensors_files import CheckpointError
from r1jax.parallel.mesh import make_mesh
from tests.interop import checkpoints as ck

IDS = np.random.default_rng(1).integers(0, 128, size=(2, 12))


def _hf_logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


def _logits(model):
    return np.asarray(jax.jit(lambda m, ids: m(ids).logits)(model, jnp.asarray(IDS, jnp.int32)))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(directory, reference transformers model on the dequantized weights, stored tensors)."""
    model = ck.tiny_v3()
    stored = ck.quantize_released(ck.released_tensors(model))
    directory = ck.write_dir(tmp_path_factory.mktemp("v3") / "released", stored, ck.released_config(model))
    reference = ck.load_into_transformers(model, ck.dequantized(stored))
    return directory, reference, stored


@pytest.mark.parametrize("name", ["qwen2", "llama3_rope_tied", "dsv3_halfrope_tied"])
def test_transformers_dir_matches_transformers(name, tmp_path):
    hf_model = ck.save_transformers(name, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) >= 3
    got = _logits(hf_dir.load_model(tmp_path))
    np.testing.assert_allclose(got, _hf_logits(hf_model), atol=1e-4, rtol=0)


def test_released_fp8_layout_matches_transformers(released):
    directory, reference, stored = released
    assert len(list(directory.glob("*.safetensors"))) == 3
    scale = stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert scale.shape == (3, 4) and stored["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 4)
    model = hf_dir.load_model(directory)
    np.testing.assert_allclose(_logits(model), _hf_logits(reference), atol=1e-4, rtol=0)
    # The MTP layer's tensors land in r1jax's MTP module, by value.
    want = ck.dequantized(stored)
    mtp = model.mtp[0]
    np.testing.assert_array_equal(np.asarray(mtp.eh_proj[...]), want["model.layers.3.eh_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.enorm.weight[...]), want["model.layers.3.enorm.weight"])
    np.testing.assert_array_equal(np.asarray(mtp.norm.weight[...]), want["model.layers.3.shared_head.norm.weight"])
    np.testing.assert_array_equal(np.asarray(mtp.block.ffn.w_down[...][5]),
                                  want["model.layers.3.mlp.experts.5.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(mtp.block.ffn.bias[...]),
                                  want["model.layers.3.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 8, 1)])
def test_meshes_give_single_device_weights_and_logits(released, shape):
    directory, _, _ = released
    single = hf_dir.load_model(directory)
    mesh = make_mesh(MeshConfig(data=shape[0], expert=shape[1], model=shape[2]))
    sharded = hf_dir.load_model(directory, mesh=mesh)
    w = sharded.moe_layers.ffn.w_gate[...]
    assert w.sharding.mesh.shape == dict(zip(("data", "expert", "model"), shape))
    if shape[1] > 1:
        assert w.addressable_shards[0].data.shape[1] == w.shape[1] // shape[1]  # experts split
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, jax.tree.leaves(sharded)),
                                jax.tree.map(np.asarray, jax.tree.leaves(single)))
    np.testing.assert_allclose(_logits(sharded), _logits(single), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad inputs


def _broken_copy(released, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(released[0], directory)
    return directory


def _index(directory):
    return json.loads((directory / "model.safetensors.index.json").read_text())


def test_missing_shard(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: missing shard"):
        hf_dir.load_model(d)


def test_truncated_shard(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    f = d / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: truncated shard"):
        hf_dir.load_model(d)


def test_unknown_architecture(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MixtralForCausalLM"], "mixtral"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: model_type: 'mixtral' is not supported"):
        hf_dir.load_model(d)


def _rewrite(d, change):
    """Applies `change(tensors)` to the tensors of the checkpoint in `d` (one file, same config)."""
    from r1jax.interop.safetensors_files import SafetensorsFiles

    files = SafetensorsFiles(d)
    tensors = {n: files.read(n) for n in files.names}
    change(tensors)
    for f in d.glob("model*"):
        f.unlink()
    ck.write_dir(d, tensors, json.loads((d / "config.json").read_text()), shards=1)


def test_shape_mismatch(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(d, lambda t: t.update({name: t[name][:, :-1], name + "_scale_inv": t[name + "_scale_inv"]}))
    with pytest.raises(CheckpointError, match=rf"shape of {name} \(model-00001-of-00001.safetensors\) is \[64, 47\], "
                                              r"config says \[64, 48\]"):
        hf_dir.load_model(d)


def test_fp8_without_scale(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    _rewrite(d, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"{name} .* is float8_e4m3fn but its scale {name}_scale_inv is missing"):
        hf_dir.load_model(d)


def test_unexpected_and_missing_tensors(released, tmp_path):
    d = _broken_copy(released, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": np.zeros((24, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.1.mlp.experts.8.up_proj.weight"):
        hf_dir.load_model(d)
    _rewrite(d, lambda t: [t.pop("model.layers.1.mlp.experts.8.up_proj.weight"), t.pop("model.norm.weight")])
    with pytest.raises(CheckpointError, match=r"missing tensor model.norm.weight"):
        hf_dir.load_model(d)
