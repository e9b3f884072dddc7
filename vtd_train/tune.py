"""Loss-weight sweeps with Ray Tune (the paper's Table 6 / 11 experiment), objective VTDA.

``vtd tune --config TRAIN.yaml --search SEARCH.yaml [--address ADDR] [--result-json URI]``

Each trial is one training run of ``TRAIN.yaml`` with the trial's loss weights: a
``TorchTrainer`` fitted from a Tune function trainable (Ray Tune cannot take a Train V2 trainer
directly; shared/REFERENCE.md §2), whose reports reach Tune through
:class:`ValidationReport`. Every trial validates at epoch ends
(:class:`~vtd_train.train.config.ValidationConfig`: ``val/vtda`` on the validation split) and
checkpoints there, and ASHA (``AsyncHyperBandScheduler``, ``time_attr`` = validations done)
stops the trials whose VTDA trails at a rung. The best trial by its last ``val/vtda`` wins; its
last checkpoint (verified) is the sweep's output.

The search file::

    loss_weights:            # LossWeights fields (Table 11's λ); each a list of values: the grid
      det: [1.0, 2.0]        # is their product (fields left out keep the config's value)
      sem: [1.0, 2.0]
    max_concurrent: 2        # trials at once (each asks for its own training workers)
    validate_every_epochs: 1
    grace_validations: 1     # ASHA: validations before a trial can be stopped
    reduction_factor: 2      # ASHA: the top 1/rf of a rung go on

Trials are named ``<run>-<hash of their loss weights>`` under the run's storage: a rerun of the
same sweep (a retried pipeline stage) resumes each trial from its own checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from vtd_train.model.config import config_from_dict, read_yaml_mapping
from vtd_train.model.losses import LossWeights
from vtd_train.train.config import TrainConfig, ValidationConfig

#: The objective: the validation VTDA a trial's epoch-end reports carry.
OBJECTIVE = "val/vtda"
#: CPUs a trial itself reserves: it only drives its TorchTrainer, whose workers ask for their
#: own; Tune refuses an empty request.
TRIAL_CPU = 0.01


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """A loss-weight sweep (see the module docstring for the keys)."""

    loss_weights: dict[str, tuple[float, ...]] = field(default_factory=dict)
    max_concurrent: int = 2
    validate_every_epochs: int = 1
    grace_validations: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(LossWeights)}
        if not isinstance(self.loss_weights, dict) or not self.loss_weights:
            raise VTDInputError(f"loss_weights: name at least one loss weight with a list of values; weights: {sorted(known)}")
        norm = {}
        for k, v in self.loss_weights.items():
            if k not in known:
                raise VTDInputError(f"loss_weights.{k}: unknown loss weight; weights: {sorted(known)}")
            if isinstance(v, (int, float)) or not isinstance(v, (list, tuple)) or not v:
                raise VTDInputError(f"loss_weights.{k}: expected a non-empty list of values, got {v!r}")
            bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0]
            if bad:
                raise VTDInputError(f"loss_weights.{k}: values must be numbers >= 0, got {bad}")
            norm[k] = tuple(float(x) for x in v)
        object.__setattr__(self, "loss_weights", norm)
        for name in ("max_concurrent", "validate_every_epochs", "grace_validations"):
            if getattr(self, name) < 1:
                raise VTDInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reduction_factor < 2:
            raise VTDInputError(f"reduction_factor must be >= 2, got {self.reduction_factor}")

    def grid(self) -> list[dict[str, float]]:
        """Every combination of the listed values, in file order."""
        keys = list(self.loss_weights)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.loss_weights[k] for k in keys))]


def search_config_from_dict(data: Any, *, source: str) -> SearchConfig:
    return config_from_dict(SearchConfig, data, source=source)


def load_search_config(uri: str) -> SearchConfig:
    return search_config_from_dict(read_yaml_mapping(uri, what="search config"), source=uri)


def trial_name(run: str, weights: dict[str, float]) -> str:
    """``<run>-<8 hex of the weights>``: the same weights, the same trial (and its checkpoints)."""
    digest = hashlib.sha256(json.dumps(sorted(weights.items())).encode()).hexdigest()[:8]
    return f"{run}-{digest}"


def trial_config(base: TrainConfig, search: SearchConfig, weights: dict[str, float]) -> TrainConfig:
    """The training config of the trial with ``weights``: the base run with those loss weights,
    validation every ``validate_every_epochs`` epochs and a checkpoint at every epoch end (the
    checkpoint a validation scored is the one the sweep may pick)."""
    model = dataclasses.replace(base.model, loss_weights=dataclasses.replace(base.model.loss_weights, **weights))
    return dataclasses.replace(
        base, name=trial_name(base.name, weights), model=model,
        validation=dataclasses.replace(base.validation, every_epochs=search.validate_every_epochs),
        checkpoint=dataclasses.replace(base.checkpoint, at_epoch_end=True),
    )


def validations(cfg: TrainConfig) -> int:
    """How many validations a run of ``cfg`` reports (the ASHA ``max_t``): each due epoch end,
    and the end of the run."""
    v: ValidationConfig = cfg.validation
    return sum(1 for e in range(1, cfg.epochs + 1) if v.due(e, cfg.epochs))


def _validation_report_callback():
    """A ``TuneReportCallback`` that passes on only the reports with the objective (a validation
    epoch end): Tune requires the objective in every result it gets."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and OBJECTIVE in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReport()


def _run_trial(params: dict[str, Any], *, base: TrainConfig, search: SearchConfig) -> None:
    """One Tune trial: fit the trial's ``TorchTrainer`` (lease, checks and clean-up as ``vtd train``)."""
    from vtd_train.train.launch import run_training

    cfg = trial_config(base, search, params["loss_weights"])
    run_training(cfg, callbacks=(_validation_report_callback(),))


def run_sweep(base: TrainConfig, search: SearchConfig) -> dict[str, Any]:
    """Run the sweep on the connected Ray cluster; returns the summary written as ``--result-json``:
    the best trial's ``checkpoint`` (URI, verified), ``loss_weights`` and ``vtda``, and every
    trial's record."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from vtd_train.checkpoint import verify_checkpoint
    from vtd_train.train.launch import _storage

    grid = search.grid()
    max_t = validations(trial_config(base, search, grid[0]))
    path, filesystem = _storage(base.storage_path)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_run_trial, base=base, search=search), {"CPU": TRIAL_CPU}),
        param_space={"loss_weights": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE, mode="max", max_concurrent_trials=search.max_concurrent,
            # max_t one past the last validation: ASHA never stops a trial at its natural end (a
            # stopped trial is killed; one that ends returns from fit() and releases its workers)
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t + 1,
                                    grace_period=min(search.grace_validations, max_t), reduction_factor=search.reduction_factor),
        ),
        run_config=tune.RunConfig(name=f"{base.name}-tune", storage_path=path, storage_filesystem=filesystem, verbose=0),
    )
    grid_result = tuner.fit()
    trials = []
    for r in grid_result:
        weights = r.config["loss_weights"]
        history = [] if r.metrics_dataframe is None else [float(x) for x in r.metrics_dataframe[OBJECTIVE]]
        trials.append({"name": trial_name(base.name, weights), "loss_weights": weights, "vtda": history,
                       "validations": len(history), "error": None if r.error is None else str(r.error).splitlines()[0]})
    done = [t for t in trials if t["vtda"]]
    if not done:
        errors = "; ".join(f"{t['name']}: {t['error']}" for t in trials if t["error"]) or "no trial reported a validation"
        raise RuntimeError(f"vtd tune: no trial finished a validation ({errors})")
    best = max(done, key=lambda t: t["vtda"][-1])
    best_result = next(r for r in grid_result if trial_name(base.name, r.config["loss_weights"]) == best["name"])
    ckpt_path = best_result.metrics.get("checkpoint_path")
    if not ckpt_path:
        raise RuntimeError(f"vtd tune: the best trial {best['name']} reported no checkpoint with its validation")
    checkpoint = fsio.join(base.storage_path, best["name"], ckpt_path.rstrip("/").rsplit("/", 1)[-1])
    verify_checkpoint(checkpoint)
    return {"checkpoint": checkpoint, "trial": best["name"], "loss_weights": {**dataclasses.asdict(base.model.loss_weights),
                                                                               **best["loss_weights"]},
            "vtda": best["vtda"][-1], "max_validations": max_t, "trials": trials}


def _check_concurrency(base: TrainConfig, search: SearchConfig, info: Any) -> None:
    """``max_concurrent`` trials must fit the cluster at once: a trial whose training workers
    cannot be placed times out in Ray Train's worker-group start. An error on the embedded
    cluster; a warning on a remote one (its autoscaler may add nodes)."""
    res = base.resources
    concurrent = min(search.max_concurrent, len(search.grid()))
    need_cpu = concurrent * (res.num_workers * res.cpus_per_worker + TRIAL_CPU)
    need_gpu = concurrent * res.num_workers if res.use_gpu else 0
    if info.num_cpus + 1e-9 >= need_cpu and info.num_gpus >= need_gpu:
        return
    msg = (f"max_concurrent {concurrent} trials × {res.num_workers} worker(s) × {res.cpus_per_worker:g} CPU"
           f"{' + 1 GPU' if res.use_gpu else ''} need {need_cpu:g} CPUs / {need_gpu} GPUs; the cluster has "
           f"{info.num_cpus:g} / {info.num_gpus:g}")
    if info.embedded:
        raise VTDInputError(f"{msg}: lower max_concurrent or resources, or pass --address of a larger cluster")
    print(f"vtd tune: warning: {msg} now; trials wait for the autoscaler", flush=True)


def tune_command(args: argparse.Namespace) -> int:
    """``vtd tune``: load the training and search configs, connect, sweep, print the trials and
    the winner, write ``--result-json``."""
    from cluster.local import connect
    from vtd_train.train.config import load_train_config, resolve_paths
    from vtd_train.train.launch import check_config

    base = resolve_paths(load_train_config(args.config, storage_path=args.storage, name=args.name))
    search = load_search_config(args.search)
    check_config(trial_config(base, search, search.grid()[0]))
    info = connect(args.address)
    _check_concurrency(base, search, info)
    print(f"vtd tune: {len(search.grid())} trial(s) of run {base.name!r} on "
          f"{'the embedded local Ray cluster' if info.embedded else info.address}, objective {OBJECTIVE} (max), ASHA",
          flush=True)
    summary = run_sweep(base, search)
    for t in summary["trials"]:
        curve = " → ".join(f"{v:.1f}" for v in t["vtda"]) or "—"
        stopped = " (stopped by ASHA)" if 0 < t["validations"] < summary["max_validations"] else ""
        print(f"  {t['name']}: {t['loss_weights']}: val VTDA {curve}{stopped}" + (f"  error: {t['error']}" if t["error"] else ""))
    print(f"vtd tune: best {summary['trial']} (VTDA {summary['vtda']:.1f}): {summary['checkpoint']}", flush=True)
    if args.result_json:
        fsio.write_json_atomic(args.result_json, summary)
    return 0
