"""The overlapped, presence-aware gradient sync (:mod:`vtd_train.train.grad_sync`): bucket layout
and the graph walk in one process, then real gloo process groups of 2 and 3 processes
(``torch.multiprocessing``, no Ray) on a toy model whose ranks feed different heads:

* gradients equal a reference computed by hand on every rank (each rank's loss from its own
  data; the mean over the ranks that had a gradient), parameters fed nowhere stay ``None``, a
  head fed by 2 of 3 ranks is divided by 2 (not 3), frozen parameters are left out; also with
  a bucket per tensor, where a rank with no member in a bucket sends its zeros without waiting;
* fp16 communication within fp16's precision of the fp32 result, at half the bytes;
* buckets sent in bucket order from the gradient hooks while the backward still runs, and the
  same gradients, bit for bit, when sent after the backward (``overlap=False``);
* a gradient held before the step (accumulation) refused; mutable buffers broadcast from rank 0;
* the agreement arriving before, during or after a rank's backward: the same sums;
* through :class:`~vtd_train.train.step.TrainStep`: a NaN loss on one rank skips the step on
  both, nothing sent, gradients dropped; an inf gradient on one rank (finite losses) makes both GradScalers
  skip and back off together; replicas stay identical.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from vtd_train.train.grad_buckets import assign_buckets, reachable, step_buckets
from vtd_train.train.grad_sync import GradSync

HEADS = ("a", "b", "c", "never")


class Toy(nn.Module):
    """A frozen input layer, a trunk every rank uses, and heads: ``a`` fed by every rank, ``b``
    by rank 0 only, ``c`` by every rank but 0, ``never`` by none. ``forward((x, heads))`` →
    ``{"loss/det/<head>": tensor}``, the form TrainStep expects."""

    def __init__(self, width: int = 8, depth: int = 2):
        super().__init__()
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.trunk = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
        self.heads = nn.ModuleDict({k: nn.Linear(width, 1) for k in HEADS})

    def forward(self, batch):
        x, heads = batch
        h = self.trunk(self.frozen(x))
        return {f"loss/det/{k}": (self.heads[k](h) - 1.0).pow(2).mean() for k in heads}


def heads_of(rank: int) -> tuple[str, ...]:
    return ("a", "b") if rank == 0 else ("a", "c")


def batch_of(rank: int, width: int = 8):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(6, width, generator=g), heads_of(rank)


def total(model: nn.Module, batch) -> torch.Tensor:
    return sum(model(batch).values())


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# One process: layout and graph walk
# ---------------------------------------------------------------------------------------------


def test_buckets_follow_reverse_registration_order_and_sizes():
    ps = [nn.Parameter(torch.zeros(n)) for n in (400_000, 100, 100, 200_000, 400_000, 50)]  # fp32: 4 bytes each
    ps.append(nn.Parameter(torch.zeros(10, dtype=torch.float64)))
    buckets = assign_buckets(ps, bucket_mb=2.0, comm_dtype=torch.float16)
    # reversed: 6 (fp64: a bucket of its own, closed last), 5, 4 (1.6 MB: the 1 MiB first bucket closes), 3, 2, 1, 0 (2.4 MB ≥ 2 MiB)
    assert [b.params for b in buckets] == [[5, 4], [3, 2, 1, 0], [6]]
    assert [(b.dtype, b.comm_dtype) for b in buckets] == [(torch.float32, torch.float16)] * 2 + [(torch.float64, torch.float16)]
    assert all(b.index == k for k, b in enumerate(buckets))
    one = assign_buckets(ps[:6], bucket_mb=1000.0, comm_dtype=None, first_bucket_mb=1000.0)
    assert [b.params for b in one] == [[5, 4, 3, 2, 1, 0]] and one[0].comm_dtype == torch.float32

    # per step: only parameters fed somewhere are packed; a bucket fed nowhere is dropped
    sbs = step_buckets(buckets, counts=[0, 2, 1, 0, 0, 0, 0], local=[False, True, False, False, False, False, False])
    assert len(sbs) == 1 and sbs[0].bucket.index == 1
    assert sbs[0].members == [(2, 1, 0, 100), (1, 2, 100, 100)] and sbs[0].numel == 200 and sbs[0].pending == 1
    assert sbs[0].nbytes == 400  # fp16


def test_graph_walk_finds_exactly_the_parameters_backward_reaches():
    torch.manual_seed(0)
    model = Toy()
    params = trainable(model)
    acc = {torch.autograd.graph.get_gradient_edge(p).node: i for i, p in enumerate(params)}
    for rank in (0, 1):
        loss = total(model, batch_of(rank))
        found = set(reachable(loss, acc))
        loss.backward()
        assert found == {i for i, p in enumerate(params) if p.grad is not None} and found
        model.zero_grad(set_to_none=True)
    assert reachable(None, acc) == [] and reachable(torch.ones(()), acc) == []


# ---------------------------------------------------------------------------------------------
# gloo process groups
# ---------------------------------------------------------------------------------------------


def _grads(params):
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _averaging(rank: int, world: int) -> dict:
    """Synced gradients (fp32 and fp16 communication, overlapped, and fp32 after the backward)
    and the reference computed here by hand from every rank's batch."""
    torch.manual_seed(0)
    model = Toy()
    params = trainable(model)
    per_rank = [torch.autograd.grad(total(model, batch_of(q)), params, allow_unused=True) for q in range(world)]
    def mean(j: int, over_world: bool = False):
        gs = [g[j] for g in per_rank if g[j] is not None]
        return (torch.stack(gs).sum(0) / (world if over_world else len(gs))) if gs else None

    out = {"ref": [mean(j) for j in range(len(params))], "by_world": [mean(j, True) for j in range(len(params))],
           "names": [n for n, p in model.named_parameters() if p.requires_grad]}
    # (kw, when the agreement arrives: "wait" — waited for before the backward —, "any" — whenever
    # it does —, "mid" — during the backward: it pauses after head a's weight —, "late" — after
    # rank 0's backward: rank 1 sleeps before its agree)
    modes = (("fp32", {}, "wait"), ("fp16", {"comm_dtype": torch.float16}, "any"), ("post", {"overlap": False}, "any"),
             ("small", {"bucket_mb": 1e-5}, "wait"),  # a bucket per tensor: some have no local member on a rank
             ("mid", {"bucket_mb": 1e-5}, "mid"), ("late", {"bucket_mb": 1e-5}, "late"))
    for name, kw, when in modes:
        sync = GradSync(params, **kw)  # (its hooks first: they run before the pause below)
        pause = model.heads["a"].weight.register_post_accumulate_grad_hook(lambda p: time.sleep(1.0)) if when == "mid" else None
        model.zero_grad(set_to_none=True)
        loss = total(model, batch_of(rank))
        if rank == 1 and when == "late":
            time.sleep(1.0)
        sync.agree(torch.zeros(2), loss)
        if when == "wait":
            sync.agreement()
        loss.backward()
        agreed = sync.finish()
        if pause is not None:
            pause.remove()
        out[name] = {"grads": _grads(params), "counts": agreed.counts, "grad_bytes": sync.stats.grad_bytes, "armed": sync.stats.armed,
                     "phases": [x.phase for x in sync.stats.launches],
                     "sent": [(sync.buckets[x.bucket].params, x.phase) for x in sync.stats.launches]}
        sync.close()
    # a gradient left from an earlier backward (accumulation, no zero_grad) is refused: the
    # previous step's gradients are views of the buckets, whose packing changes per step
    sync = GradSync(params)
    loss = total(model, batch_of(rank))
    try:
        sync.agree(torch.zeros(2), loss)
        out["held"] = None
    except RuntimeError as e:
        out["held"] = str(e)
    sync.close()
    model.zero_grad(set_to_none=True)
    # mutable buffers: rank 0's, broadcast flattened per dtype
    bufs = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 + rank, dtype=torch.float64), torch.full((4,), 20.0 + rank)]
    GradSync(params, buffers=bufs).sync_buffers()
    out["buffers"] = [b.tolist() for b in bufs]
    return out


def _overlap(rank: int, world: int) -> dict:
    """A deeper trunk, small buckets, every rank feeding the same heads: when each bucket was
    sent, against when the last gradient arrived and when the backward returned (the agreement
    waited for before the backward, so that the schedule does not depend on when it arrives)."""
    torch.manual_seed(0)
    model = Toy(width=64, depth=6)
    params = trainable(model)
    first_layer = model.trunk[0][0].weight  # the last gradient the backward produces
    unfed = {id(p) for k in ("c", "never") for p in model.heads[k].parameters()}
    out = {}
    for overlap in (True, False):
        sync = GradSync(params, bucket_mb=0.01, overlap=overlap)  # ~10 KiB: every trunk weight (16 KiB) closes one
        seen: dict[str, float] = {}

        def last_grad(_p) -> None:
            seen["last_grad"] = time.perf_counter()

        h = first_layer.register_post_accumulate_grad_hook(last_grad)
        model.zero_grad(set_to_none=True)
        x, _ = batch_of(rank, width=64)
        loss = total(model, (x, ("a", "b")))
        sync.agree(torch.zeros(2), loss)
        sync.agreement()
        loss.backward()
        backward_end = time.perf_counter()
        sync.finish()
        h.remove()
        out[overlap] = {"launches": [(x.bucket, x.phase, x.t) for x in sync.stats.launches], "backward_end": backward_end,
                        "last_grad": seen["last_grad"], "n_buckets": len(sync.buckets), "grads": _grads(params),
                        "fed_buckets": [b.index for b in sync.buckets if any(id(params[i]) not in unfed for i in b.params)]}
        sync.close()
    return out


def _digest(model: nn.Module) -> dict[str, bytes]:
    return {n: p.detach().numpy().tobytes() for n, p in model.named_parameters()}


def _train_steps(rank: int, world: int) -> dict:
    """TrainStep with a NaN loss on rank 1 at step 0, then a clean step (fp32); then fp16 with
    a GradScaler where rank 1's gradient overflows at step 0 (finite losses), then a clean step."""
    from vtd_train.train.amp import Precision
    from vtd_train.train.grad_sync import comm_dtype_for
    from vtd_train.train.step import TrainStep

    cpu = torch.device("cpu")
    out = {}
    torch.manual_seed(0)
    model = Toy()
    params = trainable(model)
    accumulations = []
    model.trunk[0][0].weight.register_post_accumulate_grad_hook(lambda p: accumulations.append(1))

    def poison(step, losses):
        return {k: v * float("nan") if (rank == 1 and step == 0 and k == "loss/det/a") else v for k, v in losses.items()}

    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    step = TrainStep(model, opt, Precision("fp32", cpu), GradSync(params), rank=rank, loss_hook=poison)
    rows = []
    for k in range(2):
        before = _digest(model)
        res = step(batch_of(rank), step=k, lr=1e-2)
        after = _digest(model)
        rows.append({"reason": res.reason, "tasks": res.nonfinite_tasks, "detail": res.nonfinite, "backward": len(accumulations),
                     "grads": sum(p.grad is not None for p in params),
                     "changed": sorted(n for n in before if before[n] != after[n]), "after": after})
    out["nan"] = rows

    torch.manual_seed(0)
    model = Toy()
    params = trainable(model)

    def spike(step, losses):  # a finite loss whose gradient is inf once scaled (fp32: 1e34 × 65536 > 3.4e38)
        if rank == 1 and step == 0:
            losses = {**losses, "loss/det/spike": (model.heads["a"].bias * 1e34).sum()}
        return losses

    precision = Precision("fp16", cpu)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    step = TrainStep(model, opt, precision, GradSync(params, comm_dtype=comm_dtype_for("auto", "fp16")), rank=rank, loss_hook=spike)
    rows = []
    for k in range(8):  # the spike, then until the scaler has settled where fp16 gradients fit
        if k > 1 and rows[-1]["reason"] is None:
            break
        before, scale = _digest(model), precision.loss_scale
        res = step(batch_of(rank), step=k, lr=1e-2)
        after = _digest(model)
        rows.append({"reason": res.reason, "scale_before": scale, "scale": precision.loss_scale, "total": res.total,
                     "changed": sorted(n for n in before if before[n] != after[n]), "after": after})
    out["scaler"] = rows
    return out


SCENARIOS = {"averaging": _averaging, "overlap": _overlap, "train_steps": _train_steps}


def _worker(rank: int, world: int, port: int, names: tuple[str, ...], out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save({n: SCENARIOS[n](rank, world) for n in names}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, names: tuple[str, ...], tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    from cluster.local import free_port

    mp.spawn(_worker, args=(world, free_port(), names, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(2, ("averaging", "overlap", "train_steps"), tmp_path_factory.mktemp("gloo2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _spawn(3, ("averaging",), tmp_path_factory.mktemp("gloo3"))


def _check_averaging(results: list[dict], world: int) -> None:
    names = results[0]["averaging"]["names"]
    head = {k: [j for j, n in enumerate(names) if n.startswith(f"heads.{k}.")] for k in HEADS}
    trunk = [j for j, n in enumerate(names) if n.startswith("trunk.")]
    assert not any(n.startswith("frozen.") for n in names) and len(names) == len(trunk) + 2 * len(HEADS)
    expected_counts = [world if j in trunk or j in head["a"] else 1 if j in head["b"] else world - 1 if j in head["c"] else 0
                       for j in range(len(names))]
    for r in results:
        a = r["averaging"]
        for mode in ("fp32", "fp16", "post", "small", "mid", "late"):
            assert a[mode]["counts"] == expected_counts, (mode, a[mode]["counts"])
        ref = a["ref"]
        assert all((g is None) == (j in head["never"]) for j, g in enumerate(ref))
        modes = ("fp32", "fp16", "post", "small", "mid", "late")
        for j, (g32, g16, gpost, gsmall, gmid, glate) in enumerate(zip(*(a[m]["grads"] for m in modes))):
            if ref[j] is None:  # fed on no rank: no gradient anywhere
                assert all(g is None for g in (g32, g16, gpost, gsmall, gmid, glate)), names[j]
                continue
            torch.testing.assert_close(g32, ref[j], msg=lambda m, j=j: f"{names[j]}: {m}")
            torch.testing.assert_close(gsmall, ref[j], msg=lambda m, j=j: f"{names[j]} (a bucket per tensor): {m}")
            # the agreement arriving during or after the backward: the same buckets, the same sums
            assert torch.equal(gmid, gsmall) and torch.equal(glate, gsmall), names[j]
            assert torch.equal(gpost, g32), names[j]  # the same buckets, sent after the backward
            assert g16.dtype == torch.float32
            torch.testing.assert_close(g16, ref[j], rtol=2e-3, atol=2e-3 * float(ref[j].abs().max()),
                                       msg=lambda m, j=j: f"{names[j]} (fp16 communication): {m}")
        # a head fed on some ranks only is averaged over those, not over the world
        for j in head["b"] + head["c"]:
            assert not torch.allclose(a["fp32"]["grads"][j], a["by_world"][j]), names[j]
        assert a["fp16"]["grad_bytes"] * 2 == a["fp32"]["grad_bytes"] > 0
        # one 25 MB bucket: sent from the last gradient hook (overlap) or after the backward
        assert a["fp32"]["phases"] == ["backward"] and a["post"]["phases"] == ["finish"]
        # a bucket per tensor: every fed one sent once, in order; head c's (first in bucket order)
        # have no member on rank 0, which sends them before its backward even starts
        sent = a["small"]["sent"]
        assert [j for js, _ in sent for j in js] == [j for j in reversed(range(len(names))) if expected_counts[j]]
        phase_c = {p for js, p in sent if js[0] in head["c"]}
        assert phase_c == ({"agree"} if r is results[0] else {"backward"}), phase_c
        assert a["small"]["armed"] == "agree"
        # rank 1 slept before its agree: rank 0's backward ended before the agreement came, so
        # rank 0 kept its gradients and packed and sent them all after the backward
        if r is results[0]:
            assert a["late"]["armed"] == "finish" and set(a["late"]["phases"]) == {"finish"}, a["late"]
        # the agreement came while the backward paused: the hook after the pause armed the step,
        # packed the gradients kept so far, and every bucket went from the hooks
        assert a["mid"]["armed"] == "backward" and set(a["mid"]["phases"]) == {"backward"}, a["mid"]
        assert [j for js, _ in a["mid"]["sent"] for j in js] == [j for js, _ in sent for j in js]
    for r in results:
        assert r["averaging"]["held"] is not None and "hold a gradient before the step's backward" in r["averaging"]["held"]
        assert r["averaging"]["buffers"] == [[0.0] * 3, [[10.0] * 2] * 2, [20.0] * 4]
    for mode in ("fp32", "fp16"):  # identical on every rank, bit for bit
        for j in range(len(names)):
            g0 = results[0]["averaging"][mode]["grads"][j]
            assert all((g0 is None and r["averaging"][mode]["grads"][j] is None) or torch.equal(g0, r["averaging"][mode]["grads"][j])
                       for r in results), (mode, names[j])


def test_two_ranks_average_over_the_ranks_that_fed_each_parameter(two_ranks):
    _check_averaging(two_ranks, 2)


def test_three_ranks_average_over_the_ranks_that_fed_each_parameter(three_ranks):
    _check_averaging(three_ranks, 3)


def test_buckets_are_sent_in_order_during_the_backward(two_ranks):
    for r in two_ranks:
        on, off = r["overlap"][True], r["overlap"][False]
        assert on["n_buckets"] >= 6
        sent = [b for b, _, _ in on["launches"]]
        assert sent == on["fed_buckets"] == sorted(sent), sent  # every fed bucket, once, in bucket order
        assert {p for _, p, _ in on["launches"]} == {"backward"}  # from the gradient hooks...
        times = [t for _, _, t in on["launches"]]
        assert times[0] < on["last_grad"] and times[-1] <= on["backward_end"]  # ...while the backward still ran
        assert [p for _, p, _ in off["launches"]] == ["finish"] * len(sent)
        assert min(t for _, _, t in off["launches"]) > off["backward_end"]
        for g_on, g_off in zip(on["grads"], off["grads"]):
            assert (g_on is None and g_off is None) or torch.equal(g_on, g_off)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(two_ranks):
    rows = [r["train_steps"]["nan"] for r in two_ranks]
    for rank, (first, second) in enumerate(rows):
        assert first["reason"] == "nonfinite_loss" and first["tasks"] == ("det",), first
        # no update; the backward ran (it does not wait for the agreement), its gradients dropped
        assert first["changed"] == [] and first["backward"] == 1 and first["grads"] == 0
        assert any("rank 1: loss/det/a=nan" in d for d in first["detail"]), first["detail"]
        assert second["reason"] is None and second["backward"] == 2
        changed = set(second["changed"])
        assert {"heads.b.weight", "heads.c.weight", "heads.a.weight", "trunk.0.0.weight"} <= changed
        assert not any(n.startswith(("heads.never.", "frozen.")) for n in changed), changed  # no weight decay either
    assert rows[0][1]["after"] == rows[1][1]["after"]  # replicas identical


def test_gradient_overflow_on_one_rank_skips_the_scaler_step_on_every_rank(two_ranks):
    rows = [r["train_steps"]["scaler"] for r in two_ranks]
    assert abs(rows[0][0]["total"]) < 1e30 < abs(rows[1][0]["total"]) < float("inf")  # only rank 1's (finite) loss spiked
    for steps in rows:
        first = steps[0]
        assert first["reason"] == "overflow" and first["changed"] == [], first["reason"]
        assert first["scale"] == first["scale_before"] / 2
        # later steps: overflows of the fp16 communication back the scale off until gradients fit
        assert all(s["reason"] == "overflow" and not s["changed"] for s in steps[1:-1])
        assert steps[-1]["reason"] is None and steps[-1]["changed"], [s["reason"] for s in steps]
    # every rank decided the same at every step: same reasons, scales and parameters
    assert [[(s["reason"], s["scale"]) for s in steps] for steps in rows] == [[(s["reason"], s["scale"]) for s in rows[0]]] * 2
    assert rows[0][-1]["after"] == rows[1][-1]["after"]
