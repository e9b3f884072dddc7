"""Cityscapes-3D frames (:mod:`data_pipeline.cityscapes3d.decode`) → model inputs and targets.

Frames stored at another size than the model's input are resized here (image bilinear, label
maps nearest; 2D box and centre coordinates scaled, metric depths unchanged: a resized image is
the same scene seen with scaled intrinsics).

The 3D boxes of a record (V frame) become FCOS3D targets in the image's S frame through the
frame's ``sensor_T_ISO_8855`` and intrinsics (:mod:`data_pipeline.cityscapes3d.geometry`):
projected centre, S depth, size, S Euler angles; the 2D target box is the modal one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.cityscapes3d import geometry as G
from data_pipeline.cityscapes3d.decode import CityscapesFrame

from .det3d import Det3DTargets
from .model import TaskPrompterTargets

#: ImageNet statistics (the Swin initialisation's; the public code normalises with them).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def det3d_targets(record: dict) -> Det3DTargets:
    cam = record["camera"]
    rows = []
    for b in record["boxes3d"]:
        c_s, euler = G.box_v_to_s(b["center"], b["rotation"], cam["sensor_T_ISO_8855"])
        uv = G.project(c_s[None], cam["fx"], cam["fy"], cam["u0"], cam["v0"])[0]
        rows.append((b["class"], b["modal"], uv, c_s[2], b["dimensions"], euler))
    n = len(rows)

    def col(i: int, width: int) -> Tensor:
        return torch.tensor(np.array([r[i] for r in rows], dtype=np.float32).reshape(n, width))

    return Det3DTargets(classes=torch.tensor([r[0] for r in rows], dtype=torch.long), boxes2d=col(1, 4), centers2d=col(2, 2),
                        depths=col(3, 1)[:, 0], dims=col(4, 3), euler=col(5, 3))


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``[B, H, W]`` or ``[B, C, H, W]`` → ``size`` (no-op when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.dim() == 3
    y = x[:, None] if squeeze else x
    y = F.interpolate(y.float(), size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    y = y.to(x.dtype)
    return y[:, 0] if squeeze else y


def collate(frames: list[CityscapesFrame], tasks: tuple[str, ...],
            size: tuple[int, int] | None = None) -> tuple[Tensor, TaskPrompterTargets]:
    """(normalised images ``[B, 3, H, W]``, targets of ``tasks``) at ``size`` (H, W; None: the
    frames' own, which must then agree); a task whose label some frame lacks raises ValueError
    naming the frames."""
    shapes = {f.image.shape[:2] for f in frames}
    if len(shapes) != 1 and size is None:
        raise ValueError(f"frames of different sizes {sorted(shapes)} need a common size")
    images = torch.from_numpy(np.stack([f.image for f in frames])).permute(0, 3, 1, 2).float()
    src = tuple(images.shape[-2:])
    size = tuple(size) if size is not None else src
    t = TaskPrompterTargets()
    for task in tasks:
        missing = [f.record["name"] for f in frames if task not in f.record["tasks"]]
        if missing:
            raise ValueError(f"frames {missing} have no {task} labels")
    if "sem" in tasks:
        t.sem = _resize(torch.from_numpy(np.stack([f.sem for f in frames])).long(), size, "nearest")
    if "depth" in tasks:
        t.depth = _resize(torch.from_numpy(np.stack([f.depth for f in frames])), size, "nearest")
    if "det3d" in tasks:
        sx, sy = size[1] / src[1], size[0] / src[0]
        t.det3d = [_scale_targets(det3d_targets(f.record), sx, sy) for f in frames]
    images = _resize(images, size, "bilinear")
    return (images - MEAN) / STD, t


def _scale_targets(t: Det3DTargets, sx: float, sy: float) -> Det3DTargets:
    if sx == sy == 1.0:
        return t
    return replace(t, boxes2d=t.boxes2d * torch.tensor([sx, sy, sx, sy]), centers2d=t.centers2d * torch.tensor([sx, sy]))


@dataclass
class TaskPrompterBatch:
    """A training batch: ``images [B, 3, H, W]`` normalised, ``targets``, the frames' ``names``.
    ``set_name`` is the shard set (the training shell's per-set metrics)."""

    images: Tensor
    targets: TaskPrompterTargets
    names: list[str] = field(default_factory=list)
    set_name: str = "cityscapes"

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskPrompterBatch:
        t = self.targets
        mv = lambda x: None if x is None else x.to(device, non_blocking=non_blocking)  # noqa: E731
        det = None if t.det3d is None else [Det3DTargets(**{k: mv(v) for k, v in vars(g).items()}) for g in t.det3d]
        return TaskPrompterBatch(images=mv(self.images), targets=TaskPrompterTargets(sem=mv(t.sem), depth=mv(t.depth), det3d=det),
                                 names=self.names, set_name=self.set_name)


def collate_batch(frames: list[CityscapesFrame], tasks: tuple[str, ...], size: tuple[int, int]) -> TaskPrompterBatch:
    """The loader's collate: :func:`collate` into a :class:`TaskPrompterBatch`."""
    images, targets = collate(frames, tasks, size)
    return TaskPrompterBatch(images=images, targets=targets, names=[f.record["name"] for f in frames])
