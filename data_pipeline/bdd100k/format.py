"""BDD100K / Scalabel format facts shared by the generator, converter, loader, model and metrics.

Everything here is a fact of the dataset (category lists, mask encodings, directory layout),
not a design choice of this project. Sources: the BDD100K documentation and the VTD paper
(shared/REFERENCE.md §6).
"""

from __future__ import annotations

from typing import Final

import numpy as np

# ---------------------------------------------------------------------------------------------
# Tasks and image sets
# ---------------------------------------------------------------------------------------------

#: The ten VTD tasks, in the paper's group order (classification, segmentation, localization,
#: association). These names are used everywhere: batch label presence, decoders, losses.
TASKS: Final = ("tag", "sem", "drivable", "lane", "det", "ins", "pose", "flow", "mot", "mots")

#: BDD100K image sets and the tasks each one labels (paper §3.1, §4.3).
SETS: Final = ("det", "seg", "track")
SET_TASKS: Final[dict[str, tuple[str, ...]]] = {
    "det": ("tag", "det", "pose", "drivable", "lane"),
    "seg": ("sem", "ins"),
    "track": ("mot", "mots", "flow"),
}
SPLITS: Final = ("train", "val")

# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------

WEATHERS: Final = ("rainy", "snowy", "clear", "overcast", "undefined", "partly cloudy", "foggy")
SCENES: Final = (
    "tunnel", "residential", "parking lot", "undefined", "city street", "gas stations", "highway",
)
TIMES_OF_DAY: Final = ("daytime", "night", "dawn/dusk", "undefined")

#: The ten BDD100K detection classes; VTD uses the first eight as things.
DET_CATEGORIES: Final = (
    "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    "traffic light", "traffic sign",
)
THING_CATEGORIES: Final = DET_CATEGORIES[:8]
#: Stuff-like detection classes: present in det_20 labels, not VTD detection targets.
STUFF_DET_CATEGORIES: Final = DET_CATEGORIES[8:]
#: BDD100K's mapping: these categories count as the mapped class and are marked ignored.
IGNORE_MAP: Final[dict[str, str]] = {
    "other person": "pedestrian",
    "other vehicle": "car",
    "trailer": "truck",
}
THING_TO_ID: Final = {c: i for i, c in enumerate(THING_CATEGORIES)}

#: 19 Cityscapes-style train ids of BDD100K semantic segmentation (255 = ignore).
SEM_CLASSES: Final = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
IGNORE_INDEX: Final = 255

#: Drivable area mask values. Background is not scored.
DRIVABLE_CLASSES: Final = ("direct", "alternative", "background")

# ---------------------------------------------------------------------------------------------
# Lane marking masks: value = category + (direction << 5) + (style << 4); bit 3 = background.
# ---------------------------------------------------------------------------------------------

LANE_CATEGORIES: Final = (
    "crosswalk", "double other", "double white", "double yellow",
    "road curb", "single other", "single white", "single yellow",
)
LANE_DIRECTIONS: Final = ("parallel", "vertical")
LANE_STYLES: Final = ("solid", "dashed")
LANE_BACKGROUND: Final = 255


def encode_lane(category: int, direction: int, style: int) -> int:
    """The byte written to a BDD100K lane mask for one foreground lane pixel."""
    if not (0 <= category < 8 and direction in (0, 1) and style in (0, 1)):
        raise ValueError(f"lane label out of range: category={category} direction={direction} style={style}")
    return category + (direction << 5) + (style << 4)


def decode_lane_mask(mask):
    """Lane mask bytes ``[H, W]`` → ``[3, H, W]`` uint8 class maps (direction, style, category).

    Each map holds 0 for background and ``1 + value`` for a lane pixel, which is the
    "one output per label, each with background" layout of the lane decoder. Takes a NumPy
    array (returns one) or a torch tensor (returns one on its device: the training step expands
    the compact lane bytes there).
    """
    import torch  # here, not at the top: the rest of this module is plain format facts

    if isinstance(mask, torch.Tensor):
        m = mask.to(torch.uint8)
        fg = (m & 0b1000) == 0
        return torch.stack((((m >> 5) & 1) + 1, ((m >> 4) & 1) + 1, (m & 0b111) + 1)) * fg
    m = np.asarray(mask, dtype=np.uint8)
    fg = ((m & 0b1000) == 0).view(np.uint8)  # 1 on lane pixels, 0 on background
    out = np.empty((3,) + m.shape, dtype=np.uint8)
    # Whole-array bit operations (no boolean indexing): about twice as fast on a 720p mask.
    np.multiply(((m >> 5) & 1) + 1, fg, out=out[0])
    np.multiply(((m >> 4) & 1) + 1, fg, out=out[1])
    np.multiply((m & 0b111) + 1, fg, out=out[2])
    return out


# ---------------------------------------------------------------------------------------------
# Instance / MOTS bitmasks (RGBA PNG): R = category id (1-based), G = attribute bits,
# instance id = (B << 8) + A.
# ---------------------------------------------------------------------------------------------

#: Category ids in ins_seg / seg_track bitmasks (1-based, 0 = background), BDD100K order.
BITMASK_CATEGORIES: Final = THING_CATEGORIES


def decode_bitmask(rgba: np.ndarray) -> dict[str, np.ndarray]:
    """RGBA bitmask ``[H, W, 4]`` → ``category`` (0 = background, 1..8), ``instance`` ids and
    the ``truncated``/``occluded``/``crowd``/``ignore`` bit planes, all ``[H, W]``."""
    a = np.asarray(rgba)
    if a.ndim != 3 or a.shape[2] != 4:
        raise ValueError(f"bitmask must be RGBA [H, W, 4], got shape {a.shape}")
    r, g, b, al = (a[..., i].astype(np.int32) for i in range(4))
    return {
        "category": r,
        "instance": (b << 8) + al,
        "truncated": (g >> 3) & 1,
        "occluded": (g >> 2) & 1,
        "crowd": (g >> 1) & 1,
        "ignore": g & 1,
    }


def encode_bitmask(
    category: np.ndarray, instance: np.ndarray, *, truncated=0, occluded=0, crowd=0, ignore=0
) -> np.ndarray:
    """Inverse of :func:`decode_bitmask`: per-pixel fields → RGBA uint8 ``[H, W, 4]``."""
    category = np.asarray(category)
    instance = np.asarray(instance)
    out = np.zeros(category.shape + (4,), dtype=np.uint8)
    out[..., 0] = category
    g = (np.asarray(truncated) << 3) | (np.asarray(occluded) << 2) | (np.asarray(crowd) << 1) | np.asarray(ignore)
    out[..., 1] = g
    out[..., 2] = (instance >> 8) & 0xFF
    out[..., 3] = instance & 0xFF
    return out


# ---------------------------------------------------------------------------------------------
# Pose (pose_21): 18 joints; `graph.nodes[*].visibility` is "V" (visible) or "N" (not visible).
# ---------------------------------------------------------------------------------------------

POSE_JOINTS: Final = (
    "head", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
    "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
    "left_knee", "left_ankle", "right_hand", "left_hand", "right_foot", "left_foot",
)
POSE_SIGMAS: Final = (
    0.079, 0.079, 0.079, 0.072, 0.062, 0.079, 0.072, 0.062, 0.107, 0.087, 0.089, 0.107,
    0.087, 0.089, 0.062, 0.062, 0.062, 0.062,
)
POSE_GRAPH_TYPE: Final = "Pose2D-18Joints_Pred"
POSE_VISIBLE: Final = "V"
POSE_NOT_VISIBLE: Final = "N"


def _flip_permutation() -> tuple[int, ...]:
    idx = {j: i for i, j in enumerate(POSE_JOINTS)}
    perm = []
    for j in POSE_JOINTS:
        if j.startswith("left_"):
            perm.append(idx["right_" + j[5:]])
        elif j.startswith("right_"):
            perm.append(idx["left_" + j[6:]])
        else:
            perm.append(idx[j])
    return tuple(perm)


#: ``keypoints_flipped = keypoints[POSE_FLIP_PERM]`` swaps left and right joints.
POSE_FLIP_PERM: Final = _flip_permutation()
POSE_SKELETON: Final = (
    ("head", "neck"), ("neck", "right_shoulder"), ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"), ("right_wrist", "right_hand"), ("neck", "left_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("left_wrist", "left_hand"),
    ("right_shoulder", "right_hip"), ("left_shoulder", "left_hip"), ("right_hip", "left_hip"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"), ("right_ankle", "right_foot"),
    ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("left_ankle", "left_foot"),
)

# ---------------------------------------------------------------------------------------------
# Directory layout of an extracted BDD100K root (paths relative to the root).
# ---------------------------------------------------------------------------------------------


class Layout:
    """Paths of the real BDD100K layout. ``split`` is ``train`` or ``val``."""

    @staticmethod
    def images_100k(split: str) -> str:
        return f"images/100k/{split}"

    @staticmethod
    def images_10k(split: str) -> str:
        return f"images/10k/{split}"

    @staticmethod
    def images_track(split: str) -> str:
        return f"images/track/{split}"

    @staticmethod
    def images_seg_track(split: str) -> str:
        return f"images/seg_track_20/{split}"

    @staticmethod
    def det_json(split: str) -> str:
        return f"labels/det_20/det_{split}.json"

    @staticmethod
    def pose_json(split: str) -> str:
        return f"labels/pose_21/pose_{split}.json"

    @staticmethod
    def drivable_masks(split: str) -> str:
        return f"labels/drivable/masks/{split}"

    @staticmethod
    def lane_masks(split: str) -> str:
        return f"labels/lane/masks/{split}"

    @staticmethod
    def sem_masks(split: str) -> str:
        return f"labels/sem_seg/masks/{split}"

    @staticmethod
    def ins_bitmasks(split: str) -> str:
        return f"labels/ins_seg/bitmasks/{split}"

    @staticmethod
    def box_track_dir(split: str) -> str:
        return f"labels/box_track_20/{split}"

    @staticmethod
    def seg_track_bitmasks(split: str) -> str:
        return f"labels/seg_track_20/bitmasks/{split}"
