"""Cityscapes-3D camera geometry (numpy): frames V, C, S and the image, 3D boxes between them.

Frames (``cityscapesscripts/helpers/box3dImageTransform.py``): V is the vehicle frame (ISO 8855,
x forward, y left, z up, origin on the ground below the rear axle); C has V's axes and the
camera's origin, ``p_C = sensor_T_ISO_8855 · [p_V; 1]``; S has C's origin with image axes
(x right, y down, z forward): ``p_S = K_MULT · p_C``; pixels are ``u = fx·x/z + u0``,
``v = fy·y/z + v0`` in S.

``sensor_T_ISO_8855 = [R | -R·p]`` with ``p`` the camera position ``(x, y, z)`` of the camera
JSON's extrinsic and ``R = (Rz(yaw)·Ry(pitch)·Rx(roll))ᵀ`` (checked against a published
gtBbox3d file: extrinsic x 1.7, y 0.1, z 1.22, pitch 0.038, yaw −0.0195 reproduce its matrix to
four decimals).

Quaternions are Cityscapes' ``[w, x, y, z]`` (pyquaternion's order; scipy's is ``[x, y, z, w]``).
Box rotations in S are described by intrinsic ``YXZ`` Euler angles ``(yaw, pitch, roll)``: yaw
about S's y axis (down), so a car turning left in V has a negative S yaw.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from scipy.spatial.transform import Rotation

#: C → S: x_S = −y_C, y_S = −z_C, z_S = x_C.
K_MULT: Final = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
#: Intrinsic Euler order of box rotations in S.
EULER_S: Final = "YXZ"


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def sensor_T_iso8855(x: float, y: float, z: float, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The ``3×4`` V → C transform of a camera at ``(x, y, z)`` in V with the given angles."""
    r = (_rz(yaw) @ _ry(pitch) @ _rx(roll)).T
    return np.concatenate([r, -r @ np.array([[x], [y], [z]])], axis=1)


def quat_to_matrix(q) -> np.ndarray:
    """Cityscapes ``[w, x, y, z]`` → ``3×3`` rotation matrix (normalised first)."""
    w, x, y, z = (float(v) for v in q)
    return Rotation.from_quat([x, y, z, w]).as_matrix()


def matrix_to_quat(m: np.ndarray) -> list[float]:
    x, y, z, w = Rotation.from_matrix(m).as_quat()
    return [float(w), float(x), float(y), float(z)]


def yaw_quat(yaw: float) -> list[float]:
    """The V quaternion of a box on level ground heading ``yaw`` (about V's z, left positive)."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def box_corners(center, dims, rot: np.ndarray) -> np.ndarray:
    """``[8, 3]`` corners of a box (centre, ``(length, width, height)`` along its own x, y, z,
    rotation matrix) in the box's frame; cityscapesscripts' corner order (BLB, BRB, FRB, FLB,
    BLT, BRT, FRT, FLT)."""
    l, w, h = (float(v) / 2 for v in dims)
    local = np.array([[-l, w, -h], [-l, -w, -h], [l, -w, -h], [l, w, -h],
                      [-l, w, h], [-l, -w, h], [l, -w, h], [l, w, h]])
    return local @ np.asarray(rot).T + np.asarray(center, dtype=np.float64)


def v_to_s(points_v: np.ndarray, sensor_t: np.ndarray) -> np.ndarray:
    """``[N, 3]`` points V → S."""
    t = np.asarray(sensor_t, dtype=np.float64)
    pc = np.asarray(points_v, dtype=np.float64) @ t[:, :3].T + t[:, 3]
    return pc @ K_MULT.T


def s_to_v(points_s: np.ndarray, sensor_t: np.ndarray) -> np.ndarray:
    """``[N, 3]`` points S → V (inverse of :func:`v_to_s`)."""
    t = np.asarray(sensor_t, dtype=np.float64)
    pc = np.asarray(points_s, dtype=np.float64) @ K_MULT  # K_MULT is orthonormal: inverse = transpose
    return (pc - t[:, 3]) @ t[:, :3]  # R orthonormal


def project(points_s: np.ndarray, fx: float, fy: float, u0: float, v0: float) -> np.ndarray:
    """``[N, 3]`` points in S (z > 0) → ``[N, 2]`` pixels."""
    p = np.asarray(points_s, dtype=np.float64)
    return np.stack([fx * p[:, 0] / p[:, 2] + u0, fy * p[:, 1] / p[:, 2] + v0], axis=1)


def unproject(uv: np.ndarray, depth: np.ndarray, fx: float, fy: float, u0: float, v0: float) -> np.ndarray:
    """Pixels ``[N, 2]`` at S depths ``[N]`` → ``[N, 3]`` points in S."""
    uv, z = np.asarray(uv, dtype=np.float64), np.asarray(depth, dtype=np.float64)
    return np.stack([(uv[:, 0] - u0) / fx * z, (uv[:, 1] - v0) / fy * z, z], axis=1)


def box_v_to_s(center_v, quat_v, sensor_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A V box (centre, quaternion) → (centre in S ``[3]``, Euler ``(yaw, pitch, roll)`` in S)."""
    t = np.asarray(sensor_t, dtype=np.float64)
    center_s = v_to_s(np.asarray(center_v, dtype=np.float64)[None], t)[0]
    rot_s = K_MULT @ t[:, :3] @ quat_to_matrix(quat_v) @ K_MULT.T
    return center_s, Rotation.from_matrix(rot_s).as_euler(EULER_S)


def box_s_to_v(center_s, euler_s, sensor_t: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Inverse of :func:`box_v_to_s`: (centre in V ``[3]``, quaternion ``[w, x, y, z]`` in V)."""
    t = np.asarray(sensor_t, dtype=np.float64)
    center_v = s_to_v(np.asarray(center_s, dtype=np.float64)[None], t)[0]
    rot_s = Rotation.from_euler(EULER_S, np.asarray(euler_s, dtype=np.float64)).as_matrix()
    rot_v = t[:, :3].T @ K_MULT.T @ rot_s @ K_MULT
    return center_v, matrix_to_quat(rot_v)


def amodal_box(center_v, dims, quat_v, sensor_t, fx, fy, u0, v0, width: int, height: int) -> list[float] | None:
    """``[x1, y1, x2, y2]`` of the projected box corners clipped to the image, None when a
    corner is behind the camera (z_S ≤ 0.01 m; cityscapesscripts crops such faces instead, which
    the generator avoids by keeping boxes in front) or the box misses the image."""
    corners = v_to_s(box_corners(center_v, dims, quat_to_matrix(quat_v)), sensor_t)
    if (corners[:, 2] <= 0.01).any():
        return None
    uv = project(corners, fx, fy, u0, v0)
    x1, y1 = max(0.0, uv[:, 0].min()), max(0.0, uv[:, 1].min())
    x2, y2 = min(width - 1.0, uv[:, 0].max()), min(height - 1.0, uv[:, 1].max())
    return [float(x1), float(y1), float(x2), float(y2)] if x2 > x1 and y2 > y1 else None
