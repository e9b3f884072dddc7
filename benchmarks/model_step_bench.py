"""One training step of VTDNet beside torchvision's Mask R-CNN, same run, same images.

Usage (on a GPU machine; the figures in RESULTS.md come from there)::

    uv run python benchmarks/model_step_bench.py --device cuda --precision fp16
    # CPU smoke run of the script itself (tiny sizes, numbers meaningless for throughput):
    uv run python benchmarks/model_step_bench.py --device cpu --precision fp32 --height 128 --steps 2 --warmup 1

Inputs are real loader batches: the synth generator's ``full`` (1280×720) dataset, converted
to shards, one batch of ``--batch`` frames from each image set (det, seg, track) at height
``--height`` (aspect kept). VTDNet trains on each batch with the tasks that batch labels (the
round-robin steps of joint training); Mask R-CNN trains on the same images with the batch's
instance boxes and masks (boxes filled as masks where a set has no instance masks). Both use
AdamW, ``torch.amp`` autocast and a GradScaler for fp16. Reported: images/s per model (mean
over the three sets), the ratio VTDNet / Mask R-CNN, and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torchvision

from data_pipeline.bdd100k.convert import ConvertOptions, convert
from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.bdd100k.synth import generate
from data_pipeline.loading.config import AugmentConfig
from data_pipeline.loading.transforms import prepare_batch
from vtd_train.model.losses import total_loss
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig


def real_batches(work: Path, batch: int, height: int):
    root, shards = work / "bdd100k", work / "shards"
    if not (shards / "manifest.json").exists():
        generate(str(root), seed=0, size="full", overwrite=True)
        convert(ConvertOptions(bdd_root=str(root), out=str(shards), shard_size=4, workers=2, overwrite=True,
                               progress=False))
    out = {}
    for fam in families_from_manifest(str(shards), "train"):
        cfg = LoaderConfig(batch_size=batch, num_workers=0, augment=AugmentConfig(scales=(height,), flip_prob=0.5))
        out[fam.set_name] = next(iter(MultiSetDataset([fam], cfg, rank=0, world_size=1)))
    return out


def maskrcnn_inputs(b, device):
    images = [b.images[i, :, :h, :w].float().div(255).to(device) for i, (h, w) in enumerate(b.image_sizes)]
    targets = []
    for i, t in enumerate(b.targets):
        keep = ~t.ignore
        boxes = t.boxes[keep]
        h, w = b.image_sizes[i]
        if t.instance_map is not None:
            masks = t.instance_masks()[keep][:, :h, :w].to(torch.uint8)
        else:  # det set: no instance masks — fill the boxes
            masks = torch.zeros((len(boxes), h, w), dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes.to(device), "labels": (t.classes[keep] + 1).to(device), "masks": masks.to(device)})
    return images, targets


def time_steps(step, n: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/vtd-model-bench")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[a.precision]
    torch.manual_seed(0)
    batches = {s: b.to(device) for s, b in real_batches(Path(a.workdir), a.batch, a.height).items()}
    batches = {s: prepare_batch(b) for s, b in batches.items()}

    def amp():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "fp16")
    fused = device.type == "cuda"

    vtd = VTDNet(VTDNetConfig.vtdnet(a.backbone)).to(device).train()
    opt_v = torch.optim.AdamW(vtd.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    mrcnn = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=9)
    mrcnn.to(device).train()
    opt_m = torch.optim.AdamW(mrcnn.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)

    def vtd_step(b):
        def step():
            opt_v.zero_grad(set_to_none=True)
            with amp():
                loss = total_loss(vtd(b))
            scaler.scale(loss).backward()
            scaler.step(opt_v)
            scaler.update()
        return step

    def mrcnn_step(b):
        images, targets = maskrcnn_inputs(b, device)

        def step():
            opt_m.zero_grad(set_to_none=True)
            with amp():
                loss = sum(mrcnn(images, targets).values())
            scaler.scale(loss).backward()
            scaler.step(opt_m)
            scaler.update()
        return step

    print(f"# {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{a.precision}, batch {a.batch}, height {a.height}, {a.backbone}")
    rows = []
    for s, b in batches.items():
        for name, make in (("vtdnet", vtd_step), ("maskrcnn", mrcnn_step)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sec = time_steps(make(b), a.steps, a.warmup, device)
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append((s, name, a.batch / sec, mem))
            print(f"{s:<6} {name:<9} {a.batch / sec:8.2f} img/s   step {sec * 1e3:8.1f} ms   peak {mem:6.2f} GiB")
    v = statistics.mean(r[2] for r in rows if r[1] == "vtdnet")
    m = statistics.mean(r[2] for r in rows if r[1] == "maskrcnn")
    print(f"mean over sets: VTDNet {v:.2f} img/s, Mask R-CNN {m:.2f} img/s, ratio {v / m:.2f}")


if __name__ == "__main__":
    main()
