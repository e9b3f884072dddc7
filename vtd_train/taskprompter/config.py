"""TaskPrompter configuration: typed, frozen, next to the model it configures.

The ``paper`` variant is the Cityscapes-3D model of the TaskPrompter report (Ye & Xu, §2.3) as
its public code builds it (``TaskPrompter/configs/cityscapes3d/cs_swinB_taskprompter.yml``,
``det_head_params.py``, ``utils/common_config.py``, ``utils/config.py``): Swin-B (patch 4,
window 12, embed 128, depths 2-2-18-2, heads 4-8-16-32, drop path 0.15) on 1024×2048 inputs
resized by 0.75 inside the model, one prompt per task, channel-prompt width 256, per-scale task
features decoded to 256 and fused to 450 channels, dense tasks decoded at twice each scale's
resolution and their scales summed, deconvolution heads for the dense tasks, an FCOS3D head on a
256-channel FPN over the four 450-channel scales (5 levels, strides 8-16-32-32-64 of the resized
image, regress ranges 96-192-384-768 px), loss weights semseg 100, depth 1, 3D detection 1,
NMS 0.3. These are the repository's latest Cityscapes settings (commit b83962a, "update
cityscapes experiments": ``level_embed_dim: 256``, ``final_embed_dim: 450``, ``head: deconv``),
the ones of its released model; the commit before concatenated the scales into 512 channels.
``tiny`` keeps every mechanism at a size a CPU test can train.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

from data_pipeline.cityscapes3d.format import DET3D_CLASSES, SEM_CLASSES, TASKS

INF: Final = 1e8


@dataclass(frozen=True, kw_only=True)
class SwinConfig:
    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.15

    def channels(self, stage: int) -> int:
        return self.embed_dim * 2**stage


@dataclass(frozen=True, kw_only=True)
class Det3DConfig:
    """FCOS3D head and its training / decoding settings (``det_head_params.py``)."""

    fpn_channels: int = 256
    stacked_convs: int = 3
    branch_channels: int = 256
    cls_branch: tuple[int, ...] = (256, 128)
    #: strides of the five FPN levels relative to the model's (resized) input
    strides: tuple[int, ...] = (8, 16, 32, 32, 64)
    #: regress ranges (max distance to the 2D box's sides, in pixels of the resized input)
    regress_ranges: tuple[tuple[float, float], ...] = ((-1, 96), (96, 192), (192, 384), (384, 768), (768, INF))
    center_sample_radius: float = 1.5
    centerness_alpha: float = 2.5
    cls_loss_weight: float = 5.0
    #: smooth-L1 weights of offset (2), depth, size (3), rotation (3 Euler angles), 2D box (4)
    code_weight: tuple[float, ...] = (1.0, 1.0, 0.2, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 1.0 / 9.0
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_thr: float = 0.3
    max_per_img: int = 200


@dataclass(frozen=True, kw_only=True)
class TaskPrompterConfig:
    """``image_size`` (H, W) is the input the model takes; ``input_scale`` resizes it inside the
    model (the paper trains 768×1536 from 1024×2048 inputs). ``prompting=False`` is the paper's
    multi-task baseline: the same Swin and heads without task prompts (every task reads the
    stage features). ``tasks`` selects the heads (one task: the single-task model)."""

    image_size: tuple[int, int] = (1024, 2048)
    input_scale: float = 0.75
    swin: SwinConfig = field(default_factory=SwinConfig)
    prompt_len: int = 1
    chan_embed_dim: int = 256
    #: channels of the per-scale spatial / channel decodings, and of the fused task features
    level_embed_dim: int = 256
    final_embed_dim: int = 450
    #: dense heads: "deconv" (the code: ConvT 2×2 → BN-GELU → Conv3×3-BN-GELU → Conv1×1) or
    #: "conv" (the report's text: Conv3×3-BN-ReLU → Conv1×1)
    dense_head: str = "deconv"
    det: Det3DConfig = field(default_factory=Det3DConfig)
    tasks: tuple[str, ...] = TASKS
    prompting: bool = True
    loss_weights: dict[str, float] = field(default_factory=lambda: {"sem": 100.0, "depth": 1.0, "det3d": 1.0})
    num_sem_classes: int = len(SEM_CLASSES)
    num_det_classes: int = len(DET3D_CLASSES)
    #: initial depth output (m; the log-depth layer's bias): a typical street depth
    depth_init: float = 20.0

    def __post_init__(self) -> None:
        if self.dense_head not in ("deconv", "conv"):
            raise ValueError(f"dense_head: {self.dense_head!r}, expected 'deconv' or 'conv'")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: {list(self.tasks)} must be distinct and among {list(TASKS)}")
        h, w = self.resized_size
        unit = self.swin.patch_size * 2 ** (len(self.swin.depths) - 1) * self.swin.window_size
        if h % unit or w % unit:
            raise ValueError(f"the resized input {h}x{w} must be a multiple of patch·2^(stages-1)·window = {unit} "
                             "(every stage splits into whole windows)")
        for i, heads in enumerate(self.swin.num_heads):
            if self.swin.channels(i) % heads:
                raise ValueError(f"stage {i}: {self.swin.channels(i)} channels do not split into {heads} heads")

    @property
    def resized_size(self) -> tuple[int, int]:
        return round(self.image_size[0] * self.input_scale), round(self.image_size[1] * self.input_scale)

    def stage_size(self, stage: int) -> tuple[int, int]:
        """Token grid of Swin stage ``stage`` (before its patch merging)."""
        h, w = self.resized_size
        s = self.swin.patch_size * 2**stage
        return h // s, w // s

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the backbone's four output scales: after stages 0-2's patch merging, and
        the last stage's output (strides 8, 16, 32, 32 of the resized input)."""
        n = len(self.swin.depths)
        return tuple(self.swin.channels(min(i + 1, n - 1)) for i in range(n))



def paper() -> TaskPrompterConfig:
    """Swin-B TaskPrompter of the Cityscapes-3D report."""
    return TaskPrompterConfig()


def tiny(**overrides) -> TaskPrompterConfig:
    """Every mechanism of the paper model at CPU-test size: 128×256 inputs, a 4-stage Swin of
    16-128 channels (window 4), 16-channel prompts, 32-channel task features and FPN."""
    cfg = TaskPrompterConfig(
        image_size=(128, 256), input_scale=1.0,
        swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path=0.0),
        chan_embed_dim=16, level_embed_dim=16, final_embed_dim=32,
        det=Det3DConfig(fpn_channels=32, stacked_convs=2, branch_channels=32, cls_branch=(32, 32),
                        regress_ranges=((-1, 24), (24, 48), (48, 96), (96, 192), (192, INF))),
    )
    return replace(cfg, **overrides)


VARIANTS: Final = {"paper": paper, "tiny": tiny}
