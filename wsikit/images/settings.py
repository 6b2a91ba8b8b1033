"""Settings of the image classifiers (`wsikit patches`): the ``model`` and ``train`` sections of a recipe.
Nothing here loads torch, so recipes validate (`wsikit config show`) without it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Everything needed to rebuild a classifier."""

    encoder: str = "efficientnet-lite0"
    class_names: list[str] = field(default_factory=lambda: ["0", "1"])
    multilabel: bool = False
    in_chans: int = 3
    small_input: bool = False
    dropout: float = 0.0
    input_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    weights_id: str = "random"

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def norm_mean(self) -> tuple[float, ...]:
        """Mean for the model's input channels (averaged over RGB for an adapted 1-channel stem)."""
        return self.mean if self.in_chans == 3 else (sum(self.mean) / 3,)

    @property
    def norm_std(self) -> tuple[float, ...]:
        return self.std if self.in_chans == 3 else (sum(self.std) / 3,)


@dataclass
class TrainConfig:
    """How a classifier trains (the ``train`` section of a recipe)."""

    mode: str = "transfer"
    epochs: int = 20  # total, including the head-only epochs of transfer
    head_epochs: int = 2
    lr: float = 3e-4
    head_lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    imbalance: str = "weights"
    focal_gamma: float = 2.0
    monitor: str = "auroc"  # auroc | loss (validation)
    patience: int = 5
    augment: str = "auto"  # histology | xray | none | auto (xray for grey sets, histology for colour)
    color_jitter: float = 0.0
    threshold_method: str = "youden"
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    num_workers: int = 0
    resume: bool = False
    max_minutes: float | None = None  # stop after the epoch that passes this wall-clock budget
