"""Cityscapes-3D frames (:mod:`data_pipeline.cityscapes3d.decode`) → model inputs and targets.

The 3D boxes of a record (V frame) become FCOS3D targets in the image's S frame through the
frame's ``sensor_T_ISO_8855`` and intrinsics (:mod:`data_pipeline.cityscapes3d.geometry`):
projected centre, S depth, size, S Euler angles; the 2D target box is the modal one.
"""

from __future__ import annotations

import numpy as np
import torch
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


def collate(frames: list[CityscapesFrame], tasks: tuple[str, ...]) -> tuple[Tensor, TaskPrompterTargets]:
    """(normalised images ``[B, 3, H, W]``, targets of ``tasks``); a task whose label some frame
    lacks raises (mixed label sets are the training loader's business, a later slice)."""
    images = torch.from_numpy(np.stack([f.image for f in frames])).permute(0, 3, 1, 2).float()
    t = TaskPrompterTargets()
    for task in tasks:
        missing = [f.record["name"] for f in frames if task not in f.record["tasks"]]
        if missing:
            raise ValueError(f"frames {missing} have no {task} labels")
    if "sem" in tasks:
        t.sem = torch.from_numpy(np.stack([f.sem for f in frames])).long()
    if "depth" in tasks:
        t.depth = torch.from_numpy(np.stack([f.depth for f in frames]))
    if "det3d" in tasks:
        t.det3d = [det3d_targets(f.record) for f in frames]
    return (images - MEAN) / STD, t
