"""Base networks: image → ``{c2, c3, c4, c5}`` at strides 4, 8, 16, 32 (paper §4.1).

A registry maps the user-facing name (``BackboneConfig.name``) to a builder; ImageNet weights
come from a local path or any fsspec URI named in the config and are checked against the
architecture (missing keys, unexpected keys, shape mismatches) with an error that names the
file. Nothing is downloaded at run time.

Every backbone exposes :meth:`Backbone.output_shape` ``{name: (channels, stride)}``; the FPN
and the decoders are sized from it.

=====================  ==========================================  =============================
name                   implementation                              C2–C5 channels
=====================  ==========================================  =============================
resnet18 / resnet34    torchvision (tests, demos)                  64, 128, 256, 512
resnet50 / resnet101   torchvision                                 256, 512, 1024, 2048
swin_t / swin_s        timm ``swin_{tiny,small}_patch4_window7_224``  96, 192, 384, 768
swin_b                 timm ``swin_base_patch4_window7_224``       128, 256, 512, 1024
convnext_t / _s        timm ``convnext_{tiny,small}``              96, 192, 384, 768
convnext_b             timm ``convnext_base``                      128, 256, 512, 1024
convnext_atto          timm ``convnext_atto`` (tests)              40, 80, 160, 320
=====================  ==========================================  =============================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch
from torch import Tensor, nn

from data_pipeline.errors import VTDInputError
from vtd_train.model.schema import BackboneConfig

FEATURE_NAMES: Final = ("c2", "c3", "c4", "c5")
FEATURE_STRIDES: Final = (4, 8, 16, 32)

#: ImageNet statistics on the 0..255 scale (images reach the model as uint8).
IMAGENET_MEAN: Final = (123.675, 116.28, 103.53)
IMAGENET_STD: Final = (58.395, 57.12, 57.375)

ShapeSpec = dict[str, tuple[int, int]]
"""``{feature name: (channels, stride)}`` — the shape contract between modules."""


class PretrainedWeightsError(VTDInputError):
    """A pretrained-weights file is missing, unreadable or does not fit the architecture."""


class ImageNormalizer(nn.Module):
    """uint8 ``[B, 3, H, W]`` (0..255) → float ``(x − mean) / std`` with ImageNet statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B, 3, H, W] (0..255), got {images.dtype}")
        return (images.float() - self.mean) / self.std


class Backbone(nn.Module):
    """Base class: ``forward(x [B, 3, H, W] float) -> {"c2".."c5": Tensor}``."""

    def __init__(self, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self._channels = channels

    def output_shape(self) -> ShapeSpec:
        return {n: (c, s) for n, c, s in zip(FEATURE_NAMES, self._channels, FEATURE_STRIDES)}


class TorchvisionResNet(Backbone):
    """torchvision ResNet trunk (``stem → layer1..layer4``); the classifier is dropped."""

    def __init__(self, depth: int, cfg: BackboneConfig) -> None:
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d

        builder = getattr(torchvision.models, f"resnet{depth}")
        norm_layer = {
            "frozen_bn": FrozenBatchNorm2d,
            "bn": nn.BatchNorm2d,
            "gn": lambda channels: nn.GroupNorm(32, channels),
        }[cfg.resolved_norm]
        net = builder(weights=None, norm_layer=norm_layer)
        expansion = 4 if depth >= 50 else 1
        super().__init__(tuple(c * expansion for c in (64, 128, 256, 512)))
        if cfg.pretrained:
            # Check the file against the *full* torchvision model so that the classifier keys
            # (fc.*) of an ImageNet checkpoint are expected, then drop the classifier.
            load_pretrained(net, cfg.pretrained, head_prefixes=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


class TimmBackbone(Backbone):
    """A timm Swin / ConvNeXt through ``forward_intermediates`` (NCHW, any input size).

    The model keeps timm's module names, so ImageNet checkpoints load without key remapping;
    the final norm and classifier are pruned after loading.
    """

    def __init__(self, timm_name: str, cfg: BackboneConfig) -> None:
        import timm

        kwargs: dict = {"pretrained": False, "drop_path_rate": cfg.drop_path}
        if timm_name.startswith("swin"):
            kwargs.update(dynamic_img_size=True, strict_img_size=False)
        net = timm.create_model(timm_name, **kwargs)
        channels = tuple(int(f["num_chs"]) for f in net.feature_info[-4:])
        super().__init__(channels)  # type: ignore[arg-type]
        if cfg.pretrained:
            load_pretrained(net, cfg.pretrained, head_prefixes=("head.", "norm.", "fc_norm.", "norm_pre."))
        net.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.net.forward_intermediates(x, indices=4, intermediates_only=True, output_fmt="NCHW")
        return dict(zip(FEATURE_NAMES, feats))


def _resnet(depth: int) -> Callable[[BackboneConfig], Backbone]:
    return lambda cfg: TorchvisionResNet(depth, cfg)


def _timm(name: str) -> Callable[[BackboneConfig], Backbone]:
    return lambda cfg: TimmBackbone(name, cfg)


#: The backbone registry: the user picks a base network by name.
BACKBONES: Final[dict[str, Callable[[BackboneConfig], Backbone]]] = {
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "resnet50": _resnet(50),
    "resnet101": _resnet(101),
    "swin_t": _timm("swin_tiny_patch4_window7_224"),
    "swin_s": _timm("swin_small_patch4_window7_224"),
    "swin_b": _timm("swin_base_patch4_window7_224"),
    "convnext_t": _timm("convnext_tiny"),
    "convnext_s": _timm("convnext_small"),
    "convnext_b": _timm("convnext_base"),
    "convnext_atto": _timm("convnext_atto"),
}


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return BACKBONES[cfg.name](cfg)


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


def read_state_dict(uri: str) -> dict[str, Tensor]:
    """Read a ``torch.save``d state dict from a path or fsspec URI (tensors only, no pickle code)."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise PretrainedWeightsError(f"pretrained weights not found: {uri}") from e
    except Exception as e:  # unreadable / not a torch file / unsafe pickle
        raise PretrainedWeightsError(f"cannot read pretrained weights {uri}: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{uri}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(module: nn.Module, uri: str, *, head_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``uri`` into ``module``; keys under ``head_prefixes`` may be missing or extra.

    Raises :class:`PretrainedWeightsError` naming the file and the offending keys when keys are
    missing, unexpected or of the wrong shape (i.e. the file is for another architecture).
    """
    state = read_state_dict(uri)
    own = module.state_dict()
    is_head = lambda k: k.startswith(head_prefixes)  # noqa: E731
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(k for k in own if k not in state and not is_head(k) and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and not is_head(k) and not k.endswith("num_batches_tracked"))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {', '.join(mismatched[:5])}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
    if problems:
        raise PretrainedWeightsError(
            f"pretrained weights {uri} do not match {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
