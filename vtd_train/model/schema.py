"""VTDNet's configuration schema: the settings of every module and of the whole model, as frozen
dataclasses that import neither torch nor torchvision.

The modules that build the networks (:mod:`~vtd_train.model.backbone`, :mod:`~vtd_train.model.localization`,
…) take these configs; the training config (:mod:`vtd_train.train.config`), the pipeline
orchestrator and the CLI read and validate them without loading torch (torch and torchvision,
whose ``roi_align`` imports ``torch._dynamo`` and sympy: 3.8 s per process on 2 cores, 8.8 s where
nothing is compiled to bytecode; benchmarks/RESULTS.md): the orchestrator starts without them,
a train job's driver without torchvision (``tests/test_train.py`` checks both).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

from data_pipeline.bdd100k.format import POSE_JOINTS, SCENES, TASKS, THING_CATEGORIES, WEATHERS
from data_pipeline.errors import VTDInputError
from vtd_train.model.losses import LossWeights

#: The base networks :data:`vtd_train.model.backbone.BACKBONES` builds, by name.
BACKBONE_NAMES: Final = ("resnet18", "resnet34", "resnet50", "resnet101", "swin_t", "swin_s", "swin_b",
                         "convnext_t", "convnext_s", "convnext_b", "convnext_atto")
#: Normalisation choices of :class:`BackboneConfig` (ResNets).
NORMS: Final = ("auto", "frozen_bn", "gn", "bn")
NUM_THINGS: Final = len(THING_CATEGORIES)
NUM_JOINTS: Final = len(POSE_JOINTS)
#: Decoders a task builds on (its RoIs or detections come from them).
REQUIRES: dict[str, tuple[str, ...]] = {
    "ins": ("det",),
    "pose": ("det",),
    "mot": ("det",),
    "mots": ("det", "ins", "mot"),
}
VARIANTS = ("vtdnet", "mt", "single:<task>")


def _sorted_tasks(tasks) -> tuple[str, ...]:
    return tuple(t for t in TASKS if t in set(tasks))


# ---------------------------------------------------------------------------------------------
# Shared extractor and classification (backbone.py, fpn.py, classification.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Which base network to build and where its ImageNet weights live.

    ``pretrained``: a local path or fsspec URI (``s3://…``, ``gs://…``) of a state dict saved
    with ``torch.save`` (a bare state dict, or one wrapped under ``state_dict``/``model``);
    ``None`` leaves the random initialisation. Classifier-head keys are allowed to be missing
    or extra; every other key must be present with the right shape.
    ``norm``: the normalisation layers of a ResNet. ``frozen_bn`` keeps the ImageNet batch-norm
    statistics and affine parameters fixed (the detection default with pretrained weights: the
    per-GPU batch is 2 images); ``gn``: GroupNorm (32 groups), trainable, independent of the
    batch — what a ResNet trained *from scratch* needs (He et al., "Rethinking ImageNet
    Pre-training": frozen BN of a random initialisation is the identity, i.e. no normalisation
    at all, and trains detection markedly slower); ``bn``: plain batch norm (statistics
    broadcast from rank 0). ``auto`` (default): ``frozen_bn`` with ``pretrained`` weights, ``gn``
    without. ``drop_path``: stochastic depth of Swin / ConvNeXt.
    """

    name: str = "resnet50"
    pretrained: str | None = None
    norm: str = "auto"
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in BACKBONE_NAMES:
            raise VTDInputError(f"unknown backbone {self.name!r}; choose one of {sorted(BACKBONE_NAMES)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise VTDInputError(f"backbone drop_path must be in [0, 1), got {self.drop_path}")
        if self.norm not in NORMS:
            raise VTDInputError(f"backbone norm must be one of {NORMS}, got {self.norm!r}")

    @property
    def resolved_norm(self) -> str:
        """``norm`` with ``auto`` resolved: ``frozen_bn`` with pretrained weights, else ``gn``."""
        if self.norm == "auto":
            return "frozen_bn" if self.pretrained else "gn"
        return self.norm


@dataclass(frozen=True, kw_only=True)
class FPNConfig:
    out_channels: int = 256

    def __post_init__(self) -> None:
        if self.out_channels <= 0:
            raise VTDInputError(f"fpn out_channels must be positive, got {self.out_channels}")


@dataclass(frozen=True, kw_only=True)
class TaggingConfig:
    num_weathers: int = len(WEATHERS)
    num_scenes: int = len(SCENES)
    #: BatchNorm1d on the pooled, detached C5 before the dense layers (see the module docstring)
    pooled_norm: bool = False


# ---------------------------------------------------------------------------------------------
# Segmentation and localization groups, interaction blocks (segmentation.py, localization.py,
# interaction.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PixelAggregatorConfig:
    """``channels``: width of the aggregated P2-scale features; ``levels``: FPN levels summed."""

    channels: int = 128
    levels: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
    deformable: bool = True

    def __post_init__(self) -> None:
        if self.channels <= 0 or not self.levels:
            raise VTDInputError(f"bad pixel aggregator config: channels={self.channels} levels={self.levels}")


@dataclass(frozen=True, kw_only=True)
class SegDecoderConfig:
    """``num_convs`` DCN blocks of width ``channels`` before the 1×1 classifier(s)."""

    num_convs: int = 0
    channels: int = 128
    deformable: bool = True
    lane_foreground_weight: float = 10.0


@dataclass(frozen=True, kw_only=True)
class RPNConfig:
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    ignore_iou: float = 0.5


@dataclass(frozen=True, kw_only=True)
class BoxHeadConfig:
    num_classes: int = NUM_THINGS
    roi_size: int = 7
    representation: int = 1024
    # training RoI sampling
    fg_iou: float = 0.5
    bg_iou: float = 0.5
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    ignore_iou: float = 0.5
    # inference
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


@dataclass(frozen=True, kw_only=True)
class MaskHeadConfig:
    roi_size: int = 14
    num_convs: int = 4
    channels: int = 256
    mask_thresh: float = 0.5


@dataclass(frozen=True, kw_only=True)
class KeypointHeadConfig:
    """``num_convs`` 3×3 convs + one 4×4 stride-2 deconvolution (SimpleBaseline) + 1×1 → joints.

    Heatmaps are ``2·roi_size`` square; targets are Gaussians of ``sigma`` heatmap pixels.
    Keypoints are predicted for detections of ``classes`` (0 pedestrian, 1 rider).
    """

    roi_size: int = 14
    num_convs: int = 4
    channels: int = 256
    num_joints: int = NUM_JOINTS
    sigma: float = 1.5
    fg_iou: float = 0.5
    rois_per_image: int = 64
    classes: tuple[int, ...] = (0, 1)


@dataclass(frozen=True, kw_only=True)
class IntraIBConfig:
    """``task_channels`` C' per task (token width T·C'), ``num_blocks`` M, heads, MLP ratio;
    ``window_size`` applies to the windowed (segmentation) variant only."""

    task_channels: int = 32
    num_blocks: int = 2
    num_heads: int = 3
    mlp_ratio: float = 4.0
    window_size: int = 7

    def __post_init__(self) -> None:
        if self.task_channels <= 0 or self.num_blocks <= 0 or self.num_heads <= 0:
            raise VTDInputError(f"bad Intra-IB config: {self}")


@dataclass(frozen=True, kw_only=True)
class CrossIBConfig:
    """``channels`` C'' of the shared token space; ``pixel_downsample`` of the pixel side."""

    channels: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pixel_downsample: int = 8

    def __post_init__(self) -> None:
        if self.channels % self.num_heads:
            raise VTDInputError(f"Cross-IB channels {self.channels} not divisible by num_heads {self.num_heads}")


# ---------------------------------------------------------------------------------------------
# Association (flow.py, track_head.py)
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True, frozen=True)
class FlowConfig:
    """Flow decoder architecture.

    ``channels[l]`` are the pyramid feature channels of level ``l`` (finest first; level ``l``
    has stride ``4·2^l``: P2, P3, then stride-2 convolutions). ``estimator_channels`` are the
    conv widths of the per-level flow estimator (a plain chain: the "reduced dense connections"
    of the paper); ``context_channels``/``context_dilations`` the PWC-Net context network that
    refines the finest flow (empty tuples disable it).

    ``cost_norm``: how the key and warped reference features are normalised before the
    correlation — ``"cosine"`` (each channel centred on its mean over both maps, each pixel's
    vector scaled to unit length, channel *sum*: the cost is a cosine similarity in [-1, 1], as
    in DCFlow / VCN) or ``"pair"`` (UFlow's joint moments, channel mean as in PWC-Net).
    ``readout_temperature`` > 0 adds the cost volume's soft-argmax (softmax at that temperature
    over the displacements, expected ``(dx, dy)``; GC-Net's soft argmin in 2-D) as two input
    channels of every level's estimator; with ``readout_add`` the level's flow is the upsampled
    flow + that soft-argmax + the estimator's residual (the estimator corrects the matching
    instead of having to learn to read it).
    """

    channels: tuple[int, ...] = (64, 96, 128, 160)
    levels: int = 4
    max_displacement: int = 4
    estimator_channels: tuple[int, ...] = (128, 96, 64, 32)
    context_channels: tuple[int, ...] = (64, 64, 64, 32)
    context_dilations: tuple[int, ...] = (1, 2, 4, 8)
    negative_slope: float = 0.1
    cost_norm: str = "cosine"
    readout_temperature: float = 0.1
    readout_add: bool = True

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise ValueError(f"FlowConfig.levels must be >= 2 (P2 and P3), got {self.levels}")
        if len(self.channels) != self.levels:
            raise ValueError(
                f"FlowConfig.channels needs one entry per level ({self.levels}), got {self.channels}"
            )
        if self.max_displacement < 1:
            raise ValueError(f"FlowConfig.max_displacement must be >= 1, got {self.max_displacement}")
        if not self.estimator_channels:
            raise ValueError("FlowConfig.estimator_channels must not be empty")
        if len(self.context_channels) != len(self.context_dilations):
            raise ValueError(
                "FlowConfig.context_channels and context_dilations differ in length: "
                f"{self.context_channels} vs {self.context_dilations}"
            )
        if self.cost_norm not in ("cosine", "pair"):
            raise ValueError(f"FlowConfig.cost_norm must be 'cosine' or 'pair', got {self.cost_norm!r}")
        if self.readout_temperature < 0:
            raise ValueError(f"FlowConfig.readout_temperature must be >= 0, got {self.readout_temperature}")
        if self.readout_add and self.readout_temperature == 0:
            raise ValueError("FlowConfig.readout_add needs readout_temperature > 0")
        for name in ("channels", "estimator_channels", "context_channels", "context_dilations"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"FlowConfig.{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True, frozen=True)
class FlowLossConfig:
    """Unsupervised flow loss (paper appendix G: census λ 1.0, smoothness λ 4.0, edge 150).

    ``pixel_mean``/``pixel_std`` (0..255 scale, RGB) undo the model's input normalisation:
    the census transform's constants assume 0..255 intensities and the edge weight 150 assumes
    0..1 images (UFlow). ``occlusion_thr``: range map (clamped to [0, 1]) below it = occluded
    (ARFlow's 0.2). ``collision_thr``: forward-only fallback, see :class:`FlowLoss`.
    ``census_levels``: how many pyramid levels of the decoder (finest first) the census scores,
    each on images downsampled by ``2^level`` (UnFlow's multi-scale census, PWC-Net's loss at
    every level); 1 scores the finest flow only (UFlow).
    """

    census_weight: float = 1.0
    census_levels: int = 3
    smooth_weight: float = 4.0
    edge_weight: float = 150.0
    census_patch: int = 7
    census_eps: float = 0.01
    census_q: float = 0.4
    occlusion_thr: float = 0.2
    collision_thr: float = 1.5
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        if self.census_patch < 3 or self.census_patch % 2 == 0:
            raise ValueError(f"FlowLossConfig.census_patch must be odd and >= 3, got {self.census_patch}")
        if self.census_levels < 1:
            raise ValueError(f"FlowLossConfig.census_levels must be >= 1, got {self.census_levels}")
        for name in ("census_weight", "smooth_weight", "edge_weight", "census_eps", "census_q"):
            if getattr(self, name) < 0:
                raise ValueError(f"FlowLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(
                f"FlowLossConfig pixel_mean/std must be 3 values (std > 0): {self.pixel_mean}, {self.pixel_std}"
            )


@dataclass(kw_only=True, frozen=True)
class QDTrackConfig:
    """Embedding head architecture (defaults: QDTrack / REFERENCE §8).

    ``conv_bias=True`` keeps a bias in the GN-normalised convs, so the default head has
    ``4·(256·256·9 + 256 + 512) + (256·49·1024 + 1024) + (1024·256 + 256) = 15,470,848``
    parameters (vis4d's QDSimilarityHead drops the conv bias: 15,469,824). RoIs go to the FPN
    level ``floor(canonical_level + log2(sqrt(wh) / canonical_size))`` (FPN eq. 1; mmdet's
    ``finest_scale=56`` mapping is the same), clamped to the available strides.
    """

    roi_size: int = 7
    sampling_ratio: int = 0
    aligned: bool = True
    num_convs: int = 4
    conv_channels: int = 256
    conv_bias: bool = True
    num_groups: int = 32
    fc_channels: int = 1024
    embed_channels: int = 256
    canonical_size: float = 224.0
    canonical_level: int = 4

    def __post_init__(self) -> None:
        for name in ("roi_size", "conv_channels", "num_groups", "fc_channels", "embed_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"QDTrackConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_convs < 0:
            raise ValueError(f"QDTrackConfig.num_convs must be >= 0, got {self.num_convs}")
        if self.num_convs > 0 and self.conv_channels % self.num_groups:
            raise ValueError(
                f"QDTrackConfig.conv_channels ({self.conv_channels}) must be divisible by "
                f"num_groups ({self.num_groups})"
            )


@dataclass(kw_only=True, frozen=True)
class QDTrackLossConfig:
    """RoI sampling and loss settings (QDTrack / vis4d defaults, REFERENCE §8).

    ``aux_neg_margin``: QDTrack and vis4d use 0.3, mmtracking 0.1 (REFERENCE: 0.1–0.3).
    """

    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    num_samples: int = 256
    pos_fraction: float = 0.5
    add_gt_as_proposals: bool = True
    embed_weight: float = 0.25
    aux_weight: float = 1.0
    aux_neg_pos_ub: float = 3.0
    aux_pos_margin: float = 0.0
    aux_neg_margin: float = 0.3
    aux_hard_mining: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.neg_iou_thr <= self.pos_iou_thr <= 1.0:
            raise ValueError(
                "QDTrackLossConfig needs 0 <= neg_iou_thr <= pos_iou_thr <= 1, "
                f"got {self.neg_iou_thr}, {self.pos_iou_thr}"
            )
        if self.num_samples < 1 or not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(
                f"QDTrackLossConfig num_samples/pos_fraction invalid: {self.num_samples}, {self.pos_fraction}"
            )


# ---------------------------------------------------------------------------------------------
# The whole model (vtdnet.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VTDNetConfig:
    """Everything that defines a VTDNet model (architecture, task set, loss weights).

    ``tasks``: the decoders to build, a subset of ``TASKS`` closed under ``REQUIRES``.
    ``use_interaction``: Intra-IB / Cross-IB (VTDNet) or none (baselines); with interaction
    the segmentation group shares one pixel aggregator. ``num_context_objects``: RPN proposals
    per image used as the objects of the localization → segmentation Cross-IB.
    ``flow_bidirectional``: also predict ref → key flow so the loss can use the paper's range-map
    occlusion estimate (G.1); otherwise the flow loss's forward-only fallback.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    tasks: tuple[str, ...] = TASKS
    use_interaction: bool = True
    tagging: TaggingConfig = field(default_factory=TaggingConfig)
    aggregator: PixelAggregatorConfig = field(default_factory=PixelAggregatorConfig)
    seg_decoder: SegDecoderConfig = field(default_factory=SegDecoderConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    box: BoxHeadConfig = field(default_factory=BoxHeadConfig)
    mask: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    keypoint: KeypointHeadConfig = field(default_factory=KeypointHeadConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    flow_loss: FlowLossConfig = field(default_factory=FlowLossConfig)
    flow_bidirectional: bool = True
    track: QDTrackConfig = field(default_factory=QDTrackConfig)
    track_loss: QDTrackLossConfig = field(default_factory=QDTrackLossConfig)
    seg_intra: IntraIBConfig = field(default_factory=IntraIBConfig)
    loc_intra: IntraIBConfig = field(default_factory=IntraIBConfig)
    cross: CrossIBConfig = field(default_factory=CrossIBConfig)
    num_context_objects: int = 100
    loss_weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise VTDInputError(f"unknown task(s) {unknown} in VTDNetConfig.tasks; tasks are {TASKS}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise VTDInputError(f"VTDNetConfig.tasks must be non-empty without duplicates, got {self.tasks}")
        for t in self.tasks:
            missing = [r for r in REQUIRES.get(t, ()) if r not in self.tasks]
            if missing:
                raise VTDInputError(f"task {t!r} needs decoder(s) {missing} (it builds on their outputs); add them to tasks")
        if self.num_context_objects < 1:
            raise VTDInputError(f"num_context_objects must be >= 1, got {self.num_context_objects}")

    # -- variants ----------------------------------------------------------------------------

    @classmethod
    def vtdnet(cls, backbone: str = "resnet50", **kw) -> VTDNetConfig:
        """VTDNet: interaction blocks, decoders of the segmentation and localization groups
        lightened (shared pixel aggregation + one DCN block per seg decoder; 3 instead of 4
        convs in the mask and keypoint heads) to offset the blocks' cost."""
        base = dict(
            backbone=BackboneConfig(name=backbone),
            use_interaction=True,
            seg_decoder=SegDecoderConfig(num_convs=1),
            mask=MaskHeadConfig(num_convs=3),
            keypoint=KeypointHeadConfig(num_convs=3),
        )
        return cls(**(base | kw))

    @classmethod
    def multitask(cls, backbone: str = "resnet50", **kw) -> VTDNetConfig:
        """The multi-task baseline: same decoders, no interaction blocks, full-size decoders."""
        return cls(**(dict(backbone=BackboneConfig(name=backbone), use_interaction=False) | kw))

    @classmethod
    def single(cls, task: str, backbone: str = "resnet50", **kw) -> VTDNetConfig:
        """Single-task baseline: ``task``'s decoder (+ the decoders it builds on) and the extractor."""
        if task not in TASKS:
            raise VTDInputError(f"unknown task {task!r}; tasks are {TASKS}")
        needed = {task, *REQUIRES.get(task, ())}
        return cls.multitask(backbone, **(dict(tasks=_sorted_tasks(needed)) | kw))

    @classmethod
    def variant(cls, name: str, backbone: str = "resnet50", **kw) -> VTDNetConfig:
        """``"vtdnet"``, ``"mt"`` or ``"single:TASK"``."""
        if name == "vtdnet":
            return cls.vtdnet(backbone, **kw)
        if name == "mt":
            return cls.multitask(backbone, **kw)
        if name.startswith("single:"):
            return cls.single(name.split(":", 1)[1], backbone, **kw)
        raise VTDInputError(f"unknown model variant {name!r}; choose one of {VARIANTS}")

    @classmethod
    def tiny(cls, variant: str = "vtdnet", backbone: str = "resnet18", **kw) -> VTDNetConfig:
        """A CPU-sized model of the same structure for tests and demos (use ~64×96 images)."""
        small = dict(
            fpn=FPNConfig(out_channels=32),
            aggregator=PixelAggregatorConfig(channels=16),
            rpn=RPNConfig(
                anchor_sizes=(8, 16, 32, 64, 128),
                pre_nms_top_n_train=200,
                pre_nms_top_n_test=100,
                post_nms_top_n_train=100,
                post_nms_top_n_test=50,
                batch_size_per_image=64,
            ),
            box=BoxHeadConfig(representation=32, batch_size_per_image=32, detections_per_img=10),
            mask=MaskHeadConfig(channels=16, num_convs=1),
            keypoint=KeypointHeadConfig(channels=16, num_convs=1, rois_per_image=8),
            flow=FlowConfig(
                # the cost volume of 8-channel maps loses the matching (argmax right at half the
                # cells of a 2-cell roll, cosine); P2's 32 channels keep it (95%)
                channels=(32, 32, 32, 32),
                max_displacement=2,
                estimator_channels=(16, 8),
                context_channels=(8, 8),
                context_dilations=(1, 2),
            ),
            track=QDTrackConfig(num_convs=1, conv_channels=16, num_groups=4, fc_channels=32, embed_channels=16),
            track_loss=QDTrackLossConfig(num_samples=32),
            seg_intra=IntraIBConfig(task_channels=8, num_heads=2, window_size=4),
            loc_intra=IntraIBConfig(task_channels=8, num_heads=2),
            cross=CrossIBConfig(channels=16, num_heads=2),
            num_context_objects=10,
            # the from-scratch (GroupNorm) backbone's pooled C5 barely varies across images:
            # standardise it (detached) before the tagging layers (classification.py says why)
            tagging=TaggingConfig(pooled_norm=True),
        )
        base = cls.variant(variant, backbone)
        if variant == "vtdnet":
            small["seg_decoder"] = SegDecoderConfig(num_convs=1, channels=16)
        return replace(base, **(small | kw))
