"""The OmniEraser LoRA merged into FLUX weights, streamed into a safetensors file (no ComfyUI)."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from erasekit.erasers import omnieraser as oe
from erasekit.erasers import omnieraser_merge as merge
from erasekit.jobs import Host, Interrupted

HIDDEN = 32


def comfy_weights(depth=1, single=1, seed=0):
    """ComfyUI-named FLUX weights of width 32 (fp32), img_in 64 wide, plus biases and a norm scale."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"img_in.weight": (HIDDEN, 64), "img_in.bias": (HIDDEN,), "final_layer.linear.weight": (64, HIDDEN)}
    for i in range(depth):
        shapes[f"double_blocks.{i}.img_attn.qkv.weight"] = (3 * HIDDEN, HIDDEN)
        shapes[f"double_blocks.{i}.img_attn.proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"double_blocks.{i}.img_attn.norm.query_norm.scale"] = (HIDDEN // 2,)
    for i in range(single):
        shapes[f"single_blocks.{i}.linear1.weight"] = (7 * HIDDEN, HIDDEN)
    return {k: torch.randn(s, generator=g) * (3.0 if len(s) == 2 else 0.1) for k, s in shapes.items()}


def lora_for(weights, seed=1, rank=4):
    """An official-format OmniEraser LoRA on some of these weights: x_embedder widened to 256, q/k slices, proj."""
    g = torch.Generator().manual_seed(seed)
    modules = {"x_embedder": (HIDDEN, 256), "transformer_blocks.0.attn.to_q": (HIDDEN, HIDDEN),
               "transformer_blocks.0.attn.to_k": (HIDDEN, HIDDEN), "transformer_blocks.0.attn.to_out.0": (HIDDEN, HIDDEN),
               "single_transformer_blocks.0.attn.to_v": (HIDDEN, HIDDEN)}
    out = {}
    for module, (rows, cols) in modules.items():
        out[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=g)
        out[f"transformer.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    return out


def mapping_for(weights, lora):
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    return oe.map_lora(lora, shapes, depth=1, depth_single=1, hidden=HIDDEN, mlp_ratio=4.0)


def test_streamed_merge_equals_the_dict_merge_and_rounds_fp8_to_nearest():
    weights = comfy_weights()
    lora = lora_for(weights)
    mapping = mapping_for(weights, lora)
    assert mapping.unmatched == [] and mapping.widened_in_features == 256
    full = oe.merge_lora(weights, mapping)
    assert full["img_in.weight"].shape == (HIDDEN, 256)
    torch.testing.assert_close(full["img_in.weight"][:, 64:],
                               lora["transformer.x_embedder.lora_B.weight"] @ lora["transformer.x_embedder.lora_A.weight"][:, 64:])
    assert torch.equal(full["double_blocks.0.img_attn.qkv.weight"][2 * HIDDEN:], weights["double_blocks.0.img_attn.qkv.weight"][2 * HIDDEN:])
    streamed = dict(oe.merged_weights(weights, mapping))
    assert list(streamed) == list(weights) and all(torch.equal(streamed[k], full[k]) for k in full)
    fp8 = dict(oe.merged_weights(weights, mapping, dtype=torch.float8_e4m3fn))
    for key, value in full.items():
        if value.ndim == 2:
            assert fp8[key].dtype == torch.float8_e4m3fn
            assert torch.equal(fp8[key].float(), value.clamp(-448, 448).to(torch.float8_e4m3fn).float()), key
        else:  # biases and norm scales stay 16-bit in a float8 file
            assert fp8[key].dtype == torch.bfloat16 and torch.equal(fp8[key], value.to(torch.bfloat16))
    big = {"img_in.weight": torch.full((2, 2), 1e4)}
    assert torch.equal(oe.to_storage_dtype(big["img_in.weight"], torch.float8_e4m3fn).float(), torch.full((2, 2), 448.0))
    # the header plan says what the merge will produce, before it runs
    plan = oe.storage_plan({k: tuple(v.shape) for k, v in weights.items()}, {k: v.dtype for k, v in weights.items()},
                           mapping, torch.float8_e4m3fn)
    assert plan == {k: (tuple(v.shape), v.dtype) for k, v in fp8.items()}


def test_safetensors_file_round_trips_every_dtype(tmp_path):
    tensors = {"a.weight": torch.randn(3, 5).to(torch.float8_e4m3fn), "b.weight": torch.randn(4, 2).to(torch.bfloat16),
               "c.bias": torch.randn(7), "d": torch.tensor(True), "e": torch.arange(6, dtype=torch.int64).view(2, 3),
               "f": torch.randn(2, 2).half()}
    plan = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    path = merge.write_safetensors_streamed(str(tmp_path / "x.safetensors"), plan, tensors.items(), {"lora": "x", "n": 2})
    loaded = load_file(path)
    assert list(loaded) == list(tensors)  # file order = plan order
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key].view(-1).view(torch.uint8),
                                                                 value.reshape(-1).view(torch.uint8)), key
    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0 and json.loads(raw[8:8 + size])["__metadata__"] == {"lora": "x", "n": "2"}


class StopAfter(Host):
    def __init__(self, n):
        self.n, self.seen = n, 0

    def check_interrupt(self):
        self.seen += 1
        if self.seen >= self.n:
            raise Interrupted()


def test_merge_job_is_atomic_and_refuses_to_overwrite(tmp_path):
    weights = comfy_weights()
    mapping = mapping_for(weights, lora_for(weights))
    path = str(tmp_path / "merged.safetensors")
    with pytest.raises(Interrupted):
        merge.save_merged_flux(weights, mapping, path, host=StopAfter(3))
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no .partial left behind
    merge.save_merged_flux(weights, mapping, path, dtype=torch.bfloat16)
    loaded = load_file(path)
    expected = oe.merge_lora(weights, mapping, dtype=torch.bfloat16)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected) and loaded["img_in.weight"].shape == (HIDDEN, 256)
    with pytest.raises(FileExistsError, match="already exists"):
        merge.save_merged_flux(weights, mapping, path)
    wrong = {**dict(oe.merged_weights(weights, mapping)), "img_in.weight": torch.zeros(HIDDEN, 64)}
    plan = {k: (tuple(v.shape), v.dtype) for k, v in oe.merge_lora(weights, mapping).items()}
    with pytest.raises(RuntimeError, match="does not match the planned"):
        merge.write_safetensors_streamed(str(tmp_path / "bad.safetensors"), plan, wrong.items())
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.partial").exists()


def test_a_float8_model_merged_in_its_own_dtype_keeps_its_1d_weights_float8(tmp_path):
    # a FLUX loaded in fp8 has fp8 biases and norm scales too; dtype None ("same as the model") keeps each as it is
    weights = {k: v.to(torch.float8_e4m3fn) for k, v in comfy_weights().items()}
    mapping = mapping_for(weights, lora_for(weights))
    path = merge.save_merged_flux(weights, mapping, str(tmp_path / "fp8.safetensors"))
    loaded = load_file(path)
    assert {k: v.dtype for k, v in loaded.items()} == {k: torch.float8_e4m3fn for k in weights}
    assert torch.equal(loaded["img_in.bias"].view(torch.uint8), weights["img_in.bias"].view(torch.uint8))
