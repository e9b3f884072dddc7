"""Can a flow decoder learn a known global motion from the census loss alone?

Usage::

    uv run python benchmarks/flow_roll_probe.py [--data DIR] [--flow "{'cost_norm': 'pair', ...}"]
        [--steps 300] [--lr 1e-3] [--smin 2 --smax 5] [--seed 0] [--bidir 1]

Pairs are a synthetic track frame (``data_pipeline.bdd100k.synth``, ``size='tiny'``, generated
into ``--data`` if it is missing; 96×160) and its copy rolled by a random global shift (one axis
±smin..smax px, the other within ±smax). A fresh ``FlowDecoder`` (the tiny preset's
``FlowConfig`` with the ``--flow`` overrides) on the frozen P2/P3 of the untrained tiny VTDNet
trains ``--steps`` steps, batch 2, AdamW ``--lr``, on the production
``FlowLoss`` census term only (bidirectional, range-map occlusion) over the train frames. Printed:
on 40 rolled val frames, the correlation of the mean predicted (inner stride-4 cells) and the
true shift per axis, the mean absolute error and the mean |prediction|. One torch thread.
"""
import argparse
import ast
import glob
import os
import random
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
import torchvision.io as io  # noqa: E402

from vtd_train.model.flow import FlowDecoder, FlowLoss  # noqa: E402
from vtd_train.model.vtdnet import VTDNetConfig, build_model  # noqa: E402

torch.set_num_threads(1)
ap = argparse.ArgumentParser()
ap.add_argument("--data", default="runs/flow_roll_probe_data")
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--smin", type=int, default=2); ap.add_argument("--smax", type=int, default=5)
ap.add_argument("--flow", default="{}")   # FlowConfig overrides: a Python dict literal
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--bidir", type=int, default=1)
a = ap.parse_args()
torch.manual_seed(a.seed); random.seed(a.seed)
base = VTDNetConfig.tiny("vtdnet")
m = build_model(base).eval()
fcfg = replace(base.flow, **ast.literal_eval(a.flow))
dec = FlowDecoder(fcfg, base.fpn.out_channels)
loss_fn = FlowLoss(base.flow_loss)
if not os.path.isdir(os.path.join(a.data, "images", "track")):
    from data_pipeline.bdd100k.synth import generate
    generate(a.data, seed=0, size="tiny")
def load(split):
    fs = sorted(glob.glob(os.path.join(a.data, "images", "track", split, "*", "*.jpg")))
    return [io.read_image(f) for f in fs]
tr, va = load("train"), load("val")
print("frames", len(tr), len(va), tuple(tr[0].shape), "params", sum(p.numel() for p in dec.parameters()))
def pair(img, s):
    dx, dy = s
    ref = torch.roll(img, (dy, dx), dims=(1, 2))  # ref(x) = key(x - s): key(x) = ref(x + s)
    return img, ref
def rshift(rng):
    v = rng.randint(a.smin, a.smax) * rng.choice((-1, 1))
    u = rng.randint(-a.smax, a.smax)
    return (v, u) if rng.random() < 0.5 else (u, v)
def feats(x):
    with torch.no_grad():
        x = m.normalizer(x)
        p = m.extract(x)
        return [p["p2"], p["p3"]], x
opt = torch.optim.AdamW(dec.parameters(), lr=a.lr)
rng = random.Random(a.seed)
t0 = time.time()
for step in range(a.steps):
    ks, rs = [], []
    for _ in range(2):
        k, r = pair(rng.choice(tr), rshift(rng)); ks.append(k); rs.append(r)
    kf, ki = feats(torch.stack(ks)); rf, ri = feats(torch.stack(rs))
    fl = dec(kf, rf); bw = dec(rf, kf) if a.bidir else None
    out = loss_fn(fl, ki, ri, backward_flows=bw)
    loss = out["census"]  # census only
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0 or step == a.steps - 1:
        print(f"step {step} census {loss.item():.3f} {time.time()-t0:.0f}s", flush=True)
# held-out
hr = random.Random(123); P, T = [], []
dec.eval()
with torch.no_grad():
    for i in range(40):
        img = va[(i * 7) % len(va)]; s = rshift(hr)
        k, r = pair(img, s); kf, _ = feats(k[None]); rf, _ = feats(r[None])
        f = dec(kf, rf)[0][0]   # [2, h, w] stride 4, image px
        f = f[:, 2:-2, 2:-2]
        P.append(f.mean((1, 2))); T.append(torch.tensor(s, dtype=torch.float32))
P, T = torch.stack(P), torch.stack(T)
def corr(x, y): x = x - x.mean(); y = y - y.mean(); return (x * y).sum() / (x.norm() * y.norm() + 1e-9)
cx, cy = corr(P[:, 0], T[:, 0]).item(), corr(P[:, 1], T[:, 1]).item()
err = (P - T).abs().mean().item()
print(f"RESULT flow={a.flow} corr x {cx:.2f} y {cy:.2f} mean {0.5*(cx+cy):.2f} mae {err:.2f}px |pred| {P.abs().mean():.2f} time {time.time()-t0:.0f}s")
