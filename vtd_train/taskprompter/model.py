"""TaskPrompter (Ye & Xu, ICLR 2023; Cityscapes-3D report): one Swin whose task prompts learn
task-generic, task-specific and cross-task representations together, decoded into per-task
features and heads for semantic segmentation, depth and FCOS3D 3D detection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TaskPrompterConfig
from .det3d import Det3DPrediction, Det3DTargets, decode, det3d_losses
from .heads import DenseHead, Det3DLevel, FCOS3DHead
from .swin import PromptSwin
from .task_features import TaskFeatures


@dataclass
class TaskPrompterOutput:
    """``sem [B, 19, H, W]`` logits, ``depth [B, H, W]`` metres, ``det3d`` per FPN level (each
    None when the model has no such task). ``H, W`` = the input's size."""

    sem: Tensor | None = None
    depth: Tensor | None = None
    det3d: list[Det3DLevel] | None = None


@dataclass
class TaskPrompterTargets:
    """A batch's labels: ``sem [B, H, W]`` int64 (255 ignored), ``depth [B, H, W]`` metres (0 =
    invalid), ``det3d`` one :class:`Det3DTargets` per image; None where a task has none."""

    sem: Tensor | None = None
    depth: Tensor | None = None
    det3d: list[Det3DTargets] | None = field(default=None)


class TaskPrompter(nn.Module):
    def __init__(self, cfg: TaskPrompterConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = PromptSwin(cfg)
        self.task_features = TaskFeatures(cfg)
        self.heads = nn.ModuleDict()
        if "sem" in cfg.tasks:
            self.heads["sem"] = DenseHead(cfg.final_embed_dim, cfg.num_sem_classes, cfg.dense_head)
        if "depth" in cfg.tasks:
            self.heads["depth"] = DenseHead(cfg.final_embed_dim, 1, cfg.dense_head, bias_init=math.log(cfg.depth_init))
        if "det3d" in cfg.tasks:
            self.heads["det3d"] = FCOS3DHead((cfg.final_embed_dim,) * len(cfg.stage_channels), cfg.num_det_classes, cfg.det)

    @property
    def det_strides(self) -> list[float]:
        """Strides of the FPN levels in input-image pixels."""
        return [s / self.cfg.input_scale for s in self.cfg.det.strides]

    def forward(self, images: Tensor) -> TaskPrompterOutput:
        """``images [B, 3, H, W]`` normalised, ``(H, W) = cfg.image_size``."""
        size = tuple(images.shape[-2:])
        if size != tuple(self.cfg.image_size):
            raise ValueError(f"TaskPrompter takes {self.cfg.image_size[0]}x{self.cfg.image_size[1]} inputs "
                             f"(its channel prompts read whole feature maps), got {size[0]}x{size[1]}")
        x = images
        if self.cfg.input_scale != 1.0:
            x = F.interpolate(x, self.cfg.resized_size, mode="bilinear", align_corners=False)
        feats = self.task_features(self.backbone(x))
        out = TaskPrompterOutput()
        if "sem" in feats:
            out.sem = self.heads["sem"](feats["sem"], size)
        if "depth" in feats:
            # log-depth out of the linear layer: metres span two orders of magnitude, which a
            # linear output reaches only slowly at the paper's learning rates (FCOS3D does the
            # same for object depth); the L1 loss is on metres
            out.depth = self.heads["depth"](feats["depth"], size)[:, 0].exp()
        if "det3d" in feats:
            out.det3d = self.heads["det3d"](feats["det3d"])
        return out

    def losses(self, out: TaskPrompterOutput, targets: TaskPrompterTargets) -> dict[str, Tensor]:
        """Named loss terms, each already multiplied by its task's weight; ``loss/total`` is not
        added here (the training shell sums the dict in one place)."""
        w = self.cfg.loss_weights
        losses: dict[str, Tensor] = {}
        if out.sem is not None and targets.sem is not None:
            losses["loss/sem"] = w["sem"] * F.cross_entropy(out.sem, targets.sem, ignore_index=255)
        if out.depth is not None and targets.depth is not None:
            valid = targets.depth > 0
            losses["loss/depth"] = w["depth"] * ((out.depth - targets.depth).abs() * valid).sum() / valid.sum().clamp(min=1)
        if out.det3d is not None and targets.det3d is not None:
            for k, v in det3d_losses(out.det3d, targets.det3d, self.det_strides, self.cfg.det).items():
                losses[k] = w["det3d"] * v
        return losses

    def decoder(self, task: str) -> list[nn.Module]:
        """The modules only ``task`` uses: its per-scale task-feature decoders (projections in the
        baseline), its scale fusion and its head. Its prompts are parameters of the shared Swin,
        which every task reads. (A pipeline's ``trainable: [task]`` trains these alone.)"""
        if task not in self.cfg.tasks:
            raise KeyError(f"the model has no {task!r} decoder (tasks: {list(self.cfg.tasks)})")
        tf = self.task_features
        per_scale = tf.decoders if self.cfg.prompting else tf.projections
        fuse = [tf.multi_scale_fuse[task]] if task in tf.multi_scale_fuse else []
        return [scale[task] for scale in per_scale] + fuse + [self.heads[task]]

    @torch.no_grad()
    def detect(self, out: TaskPrompterOutput) -> list[Det3DPrediction]:
        return decode(out.det3d, self.det_strides, self.cfg.det)
