"""Weights offline: a fake Hugging Face cache laid out like the real repositories, local files and
folders, strict key matching, revisions, and the one-line message for gated weights that are absent."""

from __future__ import annotations

import json
import re
import socket
from dataclasses import replace

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from wsikit.encoders import EncoderError, encoder_spec
from wsikit.encoders import spec as spec_module
from wsikit.encoders.archs import HFTokens
from wsikit.encoders.build import build_backbone, finish, get_encoder

# The CONCH and Phikon towers at a small width: the same code and key layout, seconds instead of a minute.
SMALL = {
    "conch": {"kwargs": {"width": 192, "depth": 2, "heads": 3, "image_size": 64}, "input_size": 64},
    "phikon": {"kwargs": {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3,
                          "intermediate_size": 384, "image_size": 224, "patch_size": 16, "qkv_bias": True}},
}  # fmt: skip
REV_A = "0123456789abcdef0123456789abcdef01234567"
REV_B = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline, where any network use fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the offline path touched the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    return cache


def _source(name: str, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A randomly initialised backbone and its state dict under the checkpoint's own names."""
    torch.manual_seed(seed)
    spec = encoder_spec(name)
    backbone = build_backbone(spec).eval()
    target = backbone.model if isinstance(backbone, HFTokens) else backbone
    return backbone, {k: v.clone().contiguous() for k, v in target.state_dict().items()}


def _repo_files(name: str, state: dict[str, torch.Tensor]) -> dict[str, object]:
    """What the hub repository holds at a revision, in its own file layout."""
    if name == "conch":  # the whole CoCa model: visual.*, text.*, logit_scale
        full = {f"visual.{k}": v for k, v in state.items()} | {
            "text.token_embedding.weight": torch.zeros(4, 2)
        }
        return {"pytorch_model.bin": full | {"logit_scale": torch.tensor(1.0)}}
    if name == "ctranspath":  # timm-0.5 Swin: downsample at the end of a stage, mask buffers, in "model"
        old = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
            for k, v in state.items()
        }
        old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
        return {"fm_v1/ctranspath/CHIEF_CTransPath.pth": {"model": old}}
    if name == "phikon":  # a ViTModel saved with its pooler, and its config
        config = {"model_type": "vit", **encoder_spec(name).kwargs, "layer_norm_eps": 1e-12}
        width = config["hidden_size"]
        pooler = {"pooler.dense.weight": torch.zeros(width, width), "pooler.dense.bias": torch.zeros(width)}
        return {"model.safetensors": state | pooler, "config.json": config}
    return {"model.safetensors": state, "config.json": {"architecture": encoder_spec(name).arch}}


def _write(folder, files: dict[str, object]) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".json"):
            path.write_text(json.dumps(content))
        elif rel.endswith(".safetensors"):
            save_file(content, str(path))  # type: ignore[arg-type]
        else:
            torch.save(content, path)


def _snapshot(cache, name: str, revision: str, files: dict[str, object], main: bool = True) -> None:
    spec = encoder_spec(name)
    kind = "datasets" if spec.repo_type == "dataset" else "models"
    repo = cache / f"{kind}--{spec.hub_id.replace('/', '--')}"
    _write(repo / "snapshots" / revision, files)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)


def _out(model: torch.nn.Module, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("name", ["kaiko-vits16", "ctranspath", "phikon", "conch"])
def test_fake_cache_and_local_folder_load_the_same_weights(
    hf_cache, tmp_path, monkeypatch, name, one_torch_thread
):
    if name in SMALL:
        monkeypatch.setitem(spec_module._REGISTRY, name, replace(encoder_spec(name), **SMALL[name]))
    spec = encoder_spec(name)
    backbone, state = _source(name, seed=3)
    files = _repo_files(name, state)
    _snapshot(hf_cache, name, REV_A, files)
    _write(tmp_path / "download", files)
    cached = get_encoder(name)
    local = get_encoder(name, weights=tmp_path / "download")
    assert cached.weights_id == f"hf:{spec.hub_id}@{REV_A}"
    assert local.weights_id.startswith("sha256:") and len(local.weights_id) == 7 + 64
    reference = _out(finish(spec, backbone).eval(), spec.input_size)
    torch.testing.assert_close(_out(cached.model, spec.input_size), reference)
    torch.testing.assert_close(_out(local.model, spec.input_size), reference)


@pytest.mark.parametrize("fmt", [".safetensors", ".bin", ".pth"])
def test_weights_files_of_each_format(tmp_path, fmt, one_torch_thread):
    backbone, state = _source("kaiko-vits16", seed=4)
    path = tmp_path / f"w{fmt}"
    if fmt == ".safetensors":
        save_file(state, str(path))
    elif fmt == ".bin":
        torch.save(state, path)
    else:  # a training checkpoint: a container and a DataParallel prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    enc = get_encoder("kaiko-vits16", weights=path)
    spec = encoder_spec("kaiko-vits16")
    torch.testing.assert_close(_out(enc.model, 224), _out(finish(spec, backbone).eval(), 224))


def test_a_renamed_key_fails_naming_it(tmp_path):
    _, state = _source("kaiko-vits16", seed=5)
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(EncoderError) as info:
        get_encoder("kaiko-vits16", weights=tmp_path / "w.safetensors")
    message = str(info.value)
    assert "1 missing: blocks.0.attn.qkv.weight" in message
    assert "1 unexpected: blocks.0.attn.qkv_renamed.weight" in message and "\n" not in message


def test_a_config_of_another_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(spec_module._REGISTRY, "phikon", replace(encoder_spec("phikon"), **SMALL["phikon"]))
    files = _repo_files("phikon", _source("phikon", seed=6)[1])
    files["config.json"] = {**files["config.json"], "num_hidden_layers": 24}  # type: ignore[dict-item]
    _write(tmp_path / "download", files)
    with pytest.raises(EncoderError, match="num_hidden_layers=24"):
        get_encoder("phikon", weights=tmp_path / "download")


def test_revision_pin_picks_its_snapshot(hf_cache, one_torch_thread):
    old, state_a = _source("kaiko-vits16", seed=1)
    _, state_b = _source("kaiko-vits16", seed=2)
    _snapshot(hf_cache, "kaiko-vits16", REV_A, _repo_files("kaiko-vits16", state_a), main=False)
    _snapshot(hf_cache, "kaiko-vits16", REV_B, _repo_files("kaiko-vits16", state_b))
    assert get_encoder("kaiko-vits16").weights_id.endswith(REV_B)
    pinned = get_encoder("kaiko-vits16", revision=REV_A)
    assert pinned.weights_id.endswith(REV_A)
    spec = encoder_spec("kaiko-vits16")
    torch.testing.assert_close(_out(pinned.model, 224), _out(finish(spec, old).eval(), 224))


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("uni", ["https://huggingface.co/MahmoodLab/UNI", "huggingface-cli login", "huggingface-cli download MahmoodLab/UNI pytorch_model.bin"]),
        ("ctranspath", ["https://huggingface.co/datasets/MahmoodLab/hest-bench", "--repo-type dataset"]),
        ("kaiko-vits16", ["huggingface-cli download 1aurent/vit_small_patch16_224"]),
    ],
)  # fmt: skip
def test_absent_weights_fail_at_once_with_one_line(hf_cache, name, words):
    with pytest.raises(EncoderError) as info:
        get_encoder(name)
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "--weights" in message
    for word in words:
        assert word in message
    assert ("huggingface-cli login" in message) == bool(encoder_spec(name).gated)


def test_folder_without_a_clear_weights_file(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(EncoderError, match="without one clear weights file"):
        get_encoder("kaiko-vits16", weights=tmp_path)
