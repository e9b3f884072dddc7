"""Model facts for ``vtd model info``: parameter count and inference MACs (paper Table 13), of
VTDNet (:func:`model_info`) and of TaskPrompter (:func:`taskprompter_info`).

``params_m``: all parameters (trainable or not; frozen batch-norm statistics are buffers) in
millions. ``gmacs``: multiply-accumulates of one ``predict`` call on a single
``height × width`` image, counted with :class:`torch.utils.flop_counter.FlopCounterMode`
(MACs = FLOPs / 2), on a randomly initialised model (seeded) and a random image.

What is counted: matrix multiplications and linear layers, convolutions (incl. transposed),
attention (``scaled_dot_product_attention``: PyTorch counts it on GPU; the CPU kernel is added
here with PyTorch's own formula), and — added here because FlopCounterMode does not know
torchvision's custom ops — deformable convolutions (``Cin/g · k² `` MACs per output element,
the bilinear sampling of the offsets excluded) and RoIAlign (4 MACs per bilinear sample).
``gmacs_deformable`` reports the deformable convolutions' share, to compare with counters that
skip custom ops (the paper's figures most likely do). Not counted (FlopCounterMode has no
formula for them): element-wise ops, normalisation,
activations, softmax, interpolation, NMS, box coding, the flow decoder's correlation (an
element-wise product + mean) and mask pasting.

Video tasks: the flow decoder and the tracker use the previous frame, whose features an online
video model already computed; so the flow decoder runs on (frame, reference) but the reference
frame's backbone + FPN pass is subtracted (one image's worth of extraction per frame).

The RoI-based decoders' cost depends on how many boxes they see: the box decoder sees the RPN
proposals (1000 at test time), mask / embedding decoders the detections (≤ 100), the keypoint
decoder the person detections; the counts used are returned with the result. The keypoint decoder is counted on every
detection (an upper bound) so that the figure does not depend on the classes a randomly
initialised detector predicts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from data_pipeline.bdd100k.format import TASKS
from data_pipeline.loading.structures import Batch, FrameTargets
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig


def _deform_conv_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # out [B, Cout, Ho, Wo]; weight [Cout, Cin/groups, kh, kw]
    b, cout, ho, wo = out_shape
    _, cin_g, kh, kw = weight_shape
    return 2 * b * cout * ho * wo * cin_g * kh * kw


def _roi_align_flop(input_shape, rois_shape, spatial_scale, pooled_h, pooled_w, sampling_ratio, *args, out_shape=None, **kwargs) -> int:
    r, c, ph, pw = out_shape
    s = sampling_ratio if sampling_ratio > 0 else 2  # adaptive: ~2 samples per bin at FPN scales
    return 2 * 4 * r * c * ph * pw * s * s


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_flops() -> dict:
    ops = torch.ops
    # keys are op packets: FlopCounterMode looks formulas up by ``func._overloadpacket``
    mapping = {
        ops.torchvision.deform_conv2d: _deform_conv_flop,
        ops.torchvision.roi_align: _roi_align_flop,
    }
    cpu_sdpa = getattr(ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flop
    return mapping


def count_flops(fn, *args, **kwargs) -> tuple[int, dict[str, int], object]:
    """FLOPs of ``fn(*args, **kwargs)`` (with this module's custom op formulas), FLOPs per
    outermost module class called (``{"TorchvisionResNet": ..., "BoxHead": ...}``; calls of the
    same class are summed) and the result."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        out = fn(*args, **kwargs)
    per_module: dict[str, int] = {}
    counts = counter.get_flop_counts()
    per_module["deform_conv2d (op)"] = int(counts.get("Global", {}).get(torch.ops.torchvision.deform_conv2d, 0))
    for name, ops in counts.items():
        if "." not in name and name != "Global":
            per_module[name] = per_module.get(name, 0) + int(sum(ops.values()))
    return counter.get_total_flops(), per_module, out


def model_info(
    backbone: str = "resnet50",
    variant: str = "vtdnet",
    height: int = 720,
    width: int = 1280,
    *,
    config: VTDNetConfig | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """``{"params_m", "gmacs", "gflops", ...}`` of ``variant`` (``vtdnet`` | ``mt`` | ``single:TASK``)
    with ``backbone`` at ``height × width`` (see the module docstring). ``config`` overrides the
    variant's configuration (e.g. a tiny one in tests)."""
    cfg = config if config is not None else VTDNetConfig.variant(variant, backbone)
    # Count the keypoint decoder on every detection (an upper bound: at test time it runs on the
    # person detections only), so that the count does not depend on the classes a randomly
    # initialised detector happens to predict.
    cfg = replace(cfg, keypoint=replace(cfg.keypoint, classes=tuple(range(cfg.box.num_classes))))
    torch.manual_seed(seed)
    model = VTDNet(cfg).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=gen).to(device)
    video = "flow" in cfg.tasks
    batch = Batch(
        set_name="info",
        images=image,
        image_sizes=[(height, width)],
        targets=[FrameTargets()],
        labels=torch.zeros(1, len(TASKS), dtype=torch.int8),
        ref_images=image.clone() if video else None,
    )
    seen: list[int] = []
    hook = model.rpn.register_forward_hook(lambda m, i, o: seen.append(len(o.proposals[0]))) if model.rpn is not None else None
    with torch.no_grad():
        flops, per_module, preds = count_flops(model.predict, batch)
        ref_flops, ref_modules = 0, {}
        if video:  # the reference frame's extraction belongs to the previous frame
            ref_flops, ref_modules, _ = count_flops(model.extract, model.normalizer(image))
    for k, v in ref_modules.items():
        per_module[k] -= v
    deform = per_module.pop("deform_conv2d (op)")
    if hook is not None:
        hook.remove()
    p = preds[0]
    per_frame = flops - ref_flops
    return {
        "variant": variant if config is None else "custom",
        "backbone": cfg.backbone.name,
        "tasks": list(cfg.tasks),
        "height": height,
        "width": width,
        "params_m": round(params / 1e6, 2),
        "gmacs": round(per_frame / 2e9, 1),
        "gflops": round(per_frame / 1e9, 1),
        # the deformable convolutions' share (counters that skip custom ops report gmacs − this)
        "gmacs_deformable": round(deform / 2e9, 1),
        "proposals": seen[0] if seen else 0,
        "detections": 0 if p.boxes is None else int(p.boxes.shape[0]),
        "pose_detections": 0 if p.keypoints is None else int(p.keypoints.shape[0]),
        "gmacs_by_module": {k: round(v / 2e9, 2) for k, v in per_module.items() if v},
        "excluded": "element-wise ops, norms, activations, softmax, interpolation, NMS, flow correlation, "
        "mask pasting, deformable-conv offset sampling",
    }


def taskprompter_config(variant: str):
    """``paper`` (Swin-B, the Cityscapes-3D report's model), ``tiny`` (the CPU model),
    ``baseline`` (the paper's multi-task baseline: no task prompts) or ``single:TASK`` (the
    paper model with one task's head)."""
    from dataclasses import replace as dc_replace

    from data_pipeline.errors import VTDInputError
    from vtd_train.taskprompter.config import VARIANTS

    name, _, task = variant.partition(":")
    if name == "baseline" and not task:
        return dc_replace(VARIANTS["paper"](), prompting=False)
    if name == "single" and task:
        try:
            return dc_replace(VARIANTS["paper"](), tasks=(task,))
        except ValueError as e:
            raise VTDInputError(f"--variant {variant!r}: {e}") from None
    if name in VARIANTS and not task:
        return VARIANTS[name]()
    raise VTDInputError(f"--variant {variant!r}: a TaskPrompter variant is one of {sorted(VARIANTS)}, baseline, single:TASK")


def taskprompter_info(variant: str = "paper", height: int | None = None, width: int | None = None, *, config=None) -> dict:
    """``{"params_m", "gmacs", "gflops", ...}`` of a TaskPrompter variant (:func:`taskprompter_config`)
    taking ``height × width`` images (default: the variant's input size; the paper model takes
    1024×2048 and resizes it by 0.75 inside, so its figures are those of the 768×1536 forward it
    trains and evaluates with).

    The model is built and run on the meta device: shapes only, no weights or memory, so Swin-B
    at 1024×2048 counts in seconds on a CPU; the counts (FlopCounterMode's formulas, as for VTDNet)
    depend on shapes alone. The 3D boxes' decoding (score filter, NMS) is not counted, nor are
    element-wise ops, norms, activations, softmax and interpolation."""
    from dataclasses import replace as dc_replace

    from data_pipeline.errors import VTDInputError
    from vtd_train.taskprompter.model import TaskPrompter

    cfg = config if config is not None else taskprompter_config(variant)
    if height is not None or width is not None:
        size = (height or cfg.image_size[0], width or cfg.image_size[1])
        try:
            cfg = dc_replace(cfg, image_size=size)
        except ValueError as e:
            raise VTDInputError(f"--height/--width {size[0]}x{size[1]}: {e}") from None
    with torch.device("meta"):
        # no gradients: a Parameter a module takes as input (the task prompts) trips the
        # counter's module tracker when it requires grad
        model = TaskPrompter(cfg).eval().requires_grad_(False)
        image = torch.empty(1, 3, *cfg.image_size)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops, per_module, _ = count_flops(model.forward, image)  # .forward: the parts are the outermost modules
    per_module.pop("deform_conv2d (op)", None)
    return {
        "family": "taskprompter",
        "variant": variant if config is None else "custom",
        "backbone": f"swin (embed {cfg.swin.embed_dim}, depths {'-'.join(map(str, cfg.swin.depths))}, window {cfg.swin.window_size})",
        "tasks": list(cfg.tasks),
        "prompting": cfg.prompting,
        "height": cfg.image_size[0],
        "width": cfg.image_size[1],
        "resized_to": list(cfg.resized_size),
        "params_m": round(params / 1e6, 2),
        "gmacs": round(flops / 2e9, 1),
        "gflops": round(flops / 1e9, 1),
        "gmacs_by_module": {k: round(v / 2e9, 2) for k, v in per_module.items() if v},
        "excluded": "element-wise ops, norms, activations, softmax, interpolation, 3D box decoding and NMS",
    }
