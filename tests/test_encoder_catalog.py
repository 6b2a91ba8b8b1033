"""The pathology encoder catalog: every entry builds, has its published size, preprocessing and rule.

Giants are built on torch's ``meta`` device here (exact parameter count, output shape from a meta
forward); every entry under 100 M parameters really runs with random weights, and the slow tests run
them all.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace

import pytest
import timm
import torch

from wsikit.encoders import EncoderError, encoder_spec, pathology_names, registry
from wsikit.encoders.build import Encoder, build_backbone, finish, get_encoder
from wsikit.encoders.pooling import TokenPooling, embedding_rule

REQUIRED = (
    "uni", "uni2-h", "conch", "conch-v1.5", "virchow", "virchow2", "gigapath", "h-optimus-0",
    "h-optimus-1", "h0-mini", "phikon", "phikon-v2", "hibou-b", "hibou-l", "kaiko-vits16", "kaiko-vits8",
    "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14", "lunit-vits8", "ctranspath", "midnight-12k", "gpfm",
)  # fmt: skip
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
# name: (dim, input px, resize px before the centre crop, normalisation, embedding rule), from the cards
CARDS = {
    "uni": (1024, 224, 224, IMAGENET, "cls"),
    "uni2-h": (1536, 224, 224, IMAGENET, "cls"),
    "conch": (512, 448, 448, OPENAI, "pooled"),
    "conch-v1.5": (768, 448, 448, IMAGENET, "pooled"),
    "virchow": (2560, 224, 224, IMAGENET, "cls+mean"),
    "virchow2": (2560, 224, 224, IMAGENET, "cls+mean"),
    "gigapath": (1536, 224, 256, IMAGENET, "cls"),
    "h-optimus-0": (1536, 224, 224, HOPTIMUS, "cls"),
    "h-optimus-1": (1536, 224, 224, HOPTIMUS, "cls"),
    "h0-mini": (768, 224, 224, HOPTIMUS, "cls"),
    "phikon": (768, 224, 224, IMAGENET, "cls"),
    "phikon-v2": (1024, 224, 224, IMAGENET, "cls"),
    "hibou-b": (768, 224, 224, HIBOU, "cls"),
    "hibou-l": (1024, 224, 224, HIBOU, "cls"),
    "kaiko-vits16": (384, 224, 224, HALF, "cls"),
    "kaiko-vits8": (384, 224, 224, HALF, "cls"),
    "kaiko-vitb16": (768, 224, 224, HALF, "cls"),
    "kaiko-vitb8": (768, 224, 224, HALF, "cls"),
    "kaiko-vitl14": (1024, 224, 224, HALF, "cls"),
    "lunit-vits8": (384, 224, 224, LUNIT, "cls"),
    "ctranspath": (768, 224, 224, IMAGENET, "pooled"),
    "midnight-12k": (3072, 224, 224, HALF, "cls+mean"),
    "gpfm": (1024, 224, 224, IMAGENET, "cls"),
}
SMALL = [n for n, s in registry().items() if (s.params or 0) < 30e6]  # really run in `make test`


def _published(text: str) -> tuple[float, float]:
    """A printed figure ("303M", "1.1B") → (value, tolerance): half a unit of its last digit, ≥ 0.5 %."""
    number, unit = re.fullmatch(r"([\d.]+)([MB])", text).groups()  # type: ignore[union-attr]
    scale = 1e6 if unit == "M" else 1e9
    decimals = len(number.split(".")[1]) if "." in number else 0
    value = float(number) * scale
    return value, max(0.005 * value, 0.5 * 10**-decimals * scale)


def test_catalog_lists_without_importing_torch():
    code = "import sys, wsikit.encoders as e; e.list_encoders(); e.registry(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_every_required_model_is_registered_with_its_card_facts():
    assert set(REQUIRED) <= set(pathology_names())
    assert set(CARDS) == set(pathology_names())
    for name, (dim, size, resize, (mean, std), rule) in CARDS.items():
        spec = encoder_spec(name)
        assert (spec.dim, spec.input_size, spec.read_size, spec.embedding) == (dim, size, resize, rule), name
        assert (spec.mean, spec.std) == (mean, std), name
        assert spec.hub_id and spec.files and spec.licence and spec.mpp, name
        assert spec.params is not None and spec.description, name


def _needs_extra(spec) -> None:
    if spec.extra:
        pytest.importorskip(spec.extra)


@pytest.mark.parametrize("name", sorted(registry()))
def test_meta_build_has_the_exact_and_published_size_and_output_shape(name):
    spec = encoder_spec(name)
    _needs_extra(spec)
    with torch.device("meta"):
        model = finish(spec, build_backbone(spec)).eval()
        out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
    n = sum(p.numel() for p in model.parameters())
    assert n == spec.params
    assert tuple(out.shape) == (2, spec.dim)
    if spec.params_published:
        value, tolerance = _published(spec.params_published)
        assert abs(n - value) <= tolerance, f"{name}: {n:,} vs published {spec.params_published}"


@pytest.mark.parametrize("name", SMALL)
def test_small_entries_run_with_random_weights(name, one_torch_thread):
    enc = get_encoder(name, pretrained=False)
    x = torch.randint(0, 256, (2, 3, enc.read_size, enc.read_size), dtype=torch.uint8)
    with torch.inference_mode():
        out = enc.model(enc.preprocess(x))
    assert out.shape == (2, enc.dim) and torch.isfinite(out).all()
    assert enc.weights_id == "random" and enc.describe()["embedding"] == enc.embedding


@pytest.mark.parametrize(
    ("spec_name", "kwargs"),
    [
        ("conch", {"width": 192, "depth": 2, "heads": 3, "image_size": 64}),
        ("hibou-b", {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 56}),
        (
            "phikon",
            {"hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 384},
        ),
    ],
)
def test_each_family_runs_small(spec_name, kwargs):
    """The CONCH and transformers code paths, really run at a small width (the full ones: slow tests)."""
    spec = encoder_spec(spec_name)
    _needs_extra(spec)
    small = replace(spec, kwargs={**spec.kwargs, **kwargs})
    size = kwargs.get("image_size", spec.input_size)
    model = finish(small, build_backbone(small)).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert (
        out.shape == (2, 512 if spec_name == "conch" else kwargs["hidden_size"]) and torch.isfinite(out).all()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(registry()) - set(SMALL)))
def test_large_entries_run_with_random_weights(name):
    _needs_extra(encoder_spec(name))
    enc = get_encoder(name, pretrained=False)
    x = torch.randint(0, 256, (1, 3, enc.read_size, enc.read_size), dtype=torch.uint8)
    with torch.inference_mode():
        out = enc.model(enc.preprocess(x))
    assert out.shape == (1, enc.dim) and torch.isfinite(out).all()


def test_embedding_rules_on_a_synthetic_token_sequence():
    """One class token (1), four registers (100) and six patch tokens (0..5): registers never count."""
    d = 3
    tokens = torch.cat(
        [torch.ones(1, 1, d), torch.full((1, 4, d), 100.0), torch.arange(6.0)[None, :, None].expand(1, 6, d)],
        1,
    )
    assert embedding_rule("cls").fn(tokens, 5).tolist() == [[1.0] * d]
    assert embedding_rule("mean").fn(tokens, 5).tolist() == [[2.5] * d]
    assert embedding_rule("cls+mean").fn(tokens, 5).tolist() == [[1.0] * d + [2.5] * d]
    with pytest.raises(EncoderError, match="use one of"):
        embedding_rule("max")


def test_virchow2_style_pooling_excludes_the_register_tokens():
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, reg_tokens=4, global_pool=""
    ).eval()
    model = TokenPooling(vit, "cls+mean")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        tokens, out = vit.forward_features(x), model(x)
    assert vit.num_prefix_tokens == 5 and out.shape == (2, 2 * 192)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))


def test_embedding_override_changes_dim_and_is_recorded():
    enc = get_encoder("kaiko-vits16", pretrained=False, embedding="cls+mean")
    assert enc.dim == 768 and enc.embedding == "cls+mean" and enc.describe()["embedding"] == "cls+mean"
    with torch.inference_mode():
        assert enc.model(torch.randn(1, 3, 224, 224)).shape == (1, 768)


def test_centre_crop_preprocessing_reads_larger_tiles():
    """Prov-GigaPath: resize to 256, centre-crop 224 (its card's transform), not a squash to 224."""
    spec = encoder_spec("gigapath")
    enc = Encoder("gigapath", torch.nn.Identity(), 1536, 224, spec.mean, spec.std, spec.interpolation,
                  spec.precision, spec.mpp, "random", crop_pct=spec.crop_pct)  # fmt: skip
    assert enc.read_size == 256 == spec.read_size
    tile = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    x = enc.preprocess(tile)
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (tile[..., 16:240, 16:240].float() / 255 - mean) / std)
    assert "centre crop" in enc.describe()["preprocessing"]["resize"]


def test_cli_lists_the_registry_and_checks_one_entry(tmp_path, monkeypatch):
    import json

    import huggingface_hub.constants
    from typer.testing import CliRunner

    from wsikit.cli.main import app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    runner = CliRunner()
    result = runner.invoke(app, ["encoders", "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert result.exit_code == 0 and set(REQUIRED) <= set(rows)
    assert (
        rows["uni"]["weights"] == "absent"
        and rows["uni"]["gated"] == "yes"
        and rows["phikon"]["extra"] == "transformers"
    )
    result = runner.invoke(app, ["encoders", "check", "kaiko-vits16", "--json", "-b", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dim"] == 384 and report["params"] == encoder_spec("kaiko-vits16").params
    assert report["tiles_per_s"] > 0 and report["weights_id"] == "random" and "absent" in report["note"]
    result = runner.invoke(app, ["encoders", "check", "uni3"])
    assert result.exit_code == 2 and "unknown encoder 'uni3'" in result.output


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    with pytest.raises(EncoderError, match=r'pip install "wsikit\[transformers\]"'):
        get_encoder("phikon", pretrained=False)
