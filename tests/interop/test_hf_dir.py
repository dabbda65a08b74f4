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


@pytest.mark.parametrize("name", ["qwen2", "llama3_rope_tied", "dsv3_halfrope_tied", "deepseek_v2"])
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


def test_convert_cli_reports_one_line_and_writes_nothing(released, tmp_path):
    import subprocess
    import sys

    d = _broken_copy(released, tmp_path)
    f = d / "model-00001-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "r1jax.interop.convert", str(d), str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and not out.exists() and not list(tmp_path.glob("out*"))
    assert r.stderr.strip().splitlines()[-1] == f"convert: {f}: truncated shard ({f.stat().st_size} bytes, " \
        f"its header needs {f.stat().st_size + 7})"


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


def _released_671b_names() -> dict[str, tuple[int, ...]]:
    """The released V3/R1 tensors and shapes as spec §5 describes them (written out here, not
    from the name table): 61 layers (3 dense), 256 experts, the MTP layer 61, FP8 scales."""
    d, v, h, q, lat, r, f, fe, e = 7168, 129280, 128, 1536, 512, 64, 18432, 2048, 256
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}

    def fp8(name, shape):
        out[name] = shape
        out[name + "_scale_inv"] = tuple(-(-s // 128) for s in shape)

    def mlp(prefix, hidden):
        fp8(prefix + "gate_proj.weight", (hidden, d))
        fp8(prefix + "up_proj.weight", (hidden, d))
        fp8(prefix + "down_proj.weight", (d, hidden))

    for i in range(62):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (d,)
        fp8(p + "self_attn.q_a_proj.weight", (q, d))
        out[p + "self_attn.q_a_layernorm.weight"] = (q,)
        fp8(p + "self_attn.q_b_proj.weight", (h * 192, q))
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (lat + r, d))
        out[p + "self_attn.kv_a_layernorm.weight"] = (lat,)
        fp8(p + "self_attn.kv_b_proj.weight", (h * 256, lat))
        fp8(p + "self_attn.o_proj.weight", (d, h * 128))
        if i < 3:
            mlp(p + "mlp.", f)
            continue
        out[p + "mlp.gate.weight"] = (e, d)
        out[p + "mlp.gate.e_score_correction_bias"] = (e,)
        for j in range(e):
            mlp(p + f"mlp.experts.{j}.", fe)
        mlp(p + "mlp.shared_experts.", fe)
    p = "model.layers.61."
    out.update({p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                p + "shared_head.norm.weight": (d,), p + "shared_head.head.weight": (v, d),
                p + "embed_tokens.weight": (v, d)})
    return out


class _HeaderOnly:
    """Stands in for `SafetensorsFiles` with names, shapes and dtypes only (no file, no data)."""

    def __init__(self, shapes):
        self.shapes, self.names = shapes, list(shapes)

    def __contains__(self, name):
        return name in self.shapes

    def shape(self, name):
        return self.shapes[name]

    def dtype(self, name):
        return np.dtype(np.float32) if name.endswith("_scale_inv") or "norm" in name or "embed" in name \
            or "head" in name or ".gate." in name or "eh_proj" in name else np.dtype(ck.fp8.FP8)

    def file(self, name):
        from pathlib import Path
        return Path("model-00001-of-000163.safetensors")


def test_671b_released_layout_maps_every_tensor():
    from r1jax.config import load_model

    shapes = _released_671b_names()
    assert 91_000 < len(shapes) < 93_000  # spec: ~92k tensors
    cfg = load_model("configs/model/deepseek-v3-671b.yaml")
    assert hf_dir.check(_HeaderOnly(shapes), cfg) == "per_expert"
    shapes.pop("model.layers.61.mlp.experts.255.down_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"experts.255.down_proj.weight .* but its scale"):
        hf_dir.check(_HeaderOnly(shapes), cfg)


def test_fp8_experts_keep_the_released_bytes(released):
    """`expert_dtype=float8_e4m3fn`: the routed experts stay FP8 (the file's bytes, scales moved with
    them) and give the dequantized model's logits."""
    directory, _, stored = released
    model = hf_dir.load_model(directory, expert_dtype="float8_e4m3fn")
    assert model.cfg.fp8_block_size == ck.BLOCK
    w, s = model.moe_layers.ffn.w_up[...], model.moe_layers.ffn.w_up_scale_inv[...]
    assert w.dtype == jnp.float8_e4m3fn
    name = "model.layers.2.mlp.experts.6.up_proj.weight"
    np.testing.assert_array_equal(np.asarray(w[1, 6]).view(np.uint8), stored[name].T.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s[1, 6]), stored[name + "_scale_inv"].T)
    np.testing.assert_allclose(_logits(model), _logits(hf_dir.load_model(directory)), atol=1e-5, rtol=0)


def test_convert_of_export_is_bit_exact(released, tmp_path):
    """r1jax params -> HF directory (released names, MTP) -> r1jax params: the same bits."""
    from r1jax.interop.export import export

    model = hf_dir.load_model(released[0])
    out = export(model, tmp_path / "hf", dtype="float32", experts="per_expert", mtp=True, progress=False)
    again = hf_dir.load_model(out)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, jax.tree.leaves(again)),
                                jax.tree.map(np.asarray, jax.tree.leaves(model)))


RSS_CHILD = r"""
import sys
from pathlib import Path
from r1jax.interop import hf_dir

def peak():  # VmHWM: this process's peak resident set (ru_maxrss would start from the parent's at fork)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # restart the peak count here, after the imports
before = peak()
model = hf_dir.load_model(sys.argv[1])
print(peak() - before)
"""


def test_peak_rss_while_loading_is_bounded(tmp_path):
    """Growth of peak RSS while loading <= the final parameters + the largest tensor + 1 GiB
    (a load that held the checkpoint twice, as from_pretrained + from_transformers does, would not fit)."""
    import subprocess
    import sys

    from tests.interop.checkpoints import write_dir

    d, f, layers, vocab = 1024, 4096, 6, 32000
    rng = np.random.default_rng(0)
    draw = lambda *s: rng.standard_normal(s, np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": draw(vocab, d), "model.norm.weight": draw(d), "lm_head.weight": draw(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": draw(d), p + "post_attention_layernorm.weight": draw(d),
                        p + "self_attn.q_proj.weight": draw(d, d), p + "self_attn.k_proj.weight": draw(256, d),
                        p + "self_attn.v_proj.weight": draw(256, d), p + "self_attn.o_proj.weight": draw(d, d),
                        p + "mlp.gate_proj.weight": draw(f, d), p + "mlp.up_proj.weight": draw(f, d),
                        p + "mlp.down_proj.weight": draw(d, f)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 2, "max_position_embeddings": 256}
    write_dir(tmp_path, tensors, config, shards=4)
    params = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    del tensors
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=dict(__import__("os").environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert r.returncode == 0, r.stderr[-2000:]
    growth = int(r.stdout.split()[-1])
    print(f"params {params / 2**20:.0f} MiB, largest {largest / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.0f} MiB")
    assert growth <= params + largest + 2**30


def test_a_process_reads_only_the_experts_its_devices_hold():
    """Per-expert tensors are read where a device's slice needs them: the devices of one host of
    a (1, 8, 1) mesh (4 of 8, as with 2 hosts) read 4 of the 8 experts, each once."""
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(0)
    experts = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(8)]  # HF [out, in]
    reads = []
    stack = hf_dir.ExpertStack(lambda j: reads.append(j) or experts[j], (8, 5, 6), np.float32)
    mesh = make_mesh(MeshConfig(data=1, expert=8, model=1))
    sharding = NamedSharding(mesh, PartitionSpec("expert", None, None))
    host = [d for d in mesh.devices.reshape(-1)[:4]]
    for device, index in sharding.devices_indices_map((8, 5, 6)).items():
        if device in host:
            np.testing.assert_array_equal(stack[index], np.stack([e.T for e in experts])[index])
    assert sorted(reads) == [0, 1, 2, 3]
