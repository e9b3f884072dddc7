"""What each stage kind runs as its Ray job, and what it leaves behind.

Every stage attempt works in ``<run>/stages/<stage>/<key[:12]>/`` (a changed stage gets a new
directory, a retry of the same key the same one, so a retried training stage resumes from its
own last checkpoint). The job's entrypoint is one of the service's own commands:

==============  ===============================================================  =====================
kind            entrypoint                                                       output
==============  ===============================================================  =====================
init            ``vtd model init --config config.yaml --out checkpoint``          ``checkpoint/``
train           ``vtd train --config config.yaml --result-json result.json``      the run's final
                (config: the stage's training config, storage ``ray/``, the       checkpoint
                input checkpoint as ``init_checkpoint``, pseudo-labels as
                ``data.pseudo``)
tune            ``vtd tune --config config.yaml --search search.yaml               the best trial's
                --result-json result.json`` (trials under ``ray/``); a train      checkpoint and
                stage initialised from it also takes its loss weights           loss weights
pseudo_label    ``vtd pseudo-label --checkpoint sem=... --out pseudo ...``        ``pseudo/``
merge           ``vtd model merge --base ... --decoder TASK=... --out checkpoint``  ``checkpoint/``
evaluate        ``vtd evaluate --checkpoint ... --out eval``                      ``eval/metrics.json``
==============  ===============================================================  =====================

An evaluation's metrics are read as the pipeline's model family reports them
(:func:`vtd_train.train.families.evaluation_summary`): VTDNet's VTD metrics with VTDA and its
group scores, TaskPrompter's mDS, mIoU and depth RMSE.

Outputs are recorded with content hashes (:func:`orchestrator.state.checkpoint_hash`), which
the dependants' cache keys include.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from orchestrator.spec import PipelineSpec, Stage, StageResources
from orchestrator.state import checkpoint_hash, hash_files

EVAL_PREFIX = "eval-"


@dataclass(frozen=True)
class Launch:
    """A stage attempt ready to submit."""

    entrypoint: str
    directory: str
    resources: StageResources


def eval_stage(of: Stage) -> Stage:
    """The evaluation stage of a stage with ``evaluate: true`` (one Ray job, in-process
    inference: it needs one CPU, or one GPU where training used GPUs)."""
    gpu = of.train is not None and of.train.resources.use_gpu
    return Stage(name=f"{EVAL_PREFIX}{of.name}", kind="evaluate", needs=(of.name,), retries=of.retries,
                 resources=StageResources(entrypoint_num_cpus=1.0, entrypoint_num_gpus=1.0 if gpu else 0.0))


def with_evaluations(spec: PipelineSpec) -> dict[str, Stage]:
    """The spec's stages plus an evaluation stage after each one that asks for it."""
    out: dict[str, Stage] = {}
    for name, st in spec.stages.items():
        out[name] = st
        if st.evaluate:
            ev = eval_stage(st)
            out[ev.name] = ev
    return out


def select_stages(stages: dict[str, Stage], names: list[str] | None, *, source: str = "--stages") -> dict[str, Stage]:
    """``stages`` (in their order) cut down to ``names`` and every stage they need, directly or
    not; all of them when ``names`` is ``None``. A name is a stage of the pipeline or an
    evaluation stage (``eval-<stage>``); an unknown one is an error that lists the known ones."""
    if names is None:
        return dict(stages)
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise VTDInputError(f"{source}: unknown stage(s) {unknown}; stages: {', '.join(stages)}")
    if not names:
        raise VTDInputError(f"{source}: name at least one stage; stages: {', '.join(stages)}")
    keep: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(stages[n].needs)
    return {n: st for n, st in stages.items() if n in keep}


def _plain(obj: Any) -> Any:
    """Dataclass dicts with tuples → YAML-safe lists."""
    return json.loads(json.dumps(obj))


class StageExecutor:
    """Builds each stage's entrypoint and reads back its outputs, for one run."""

    def __init__(self, spec: PipelineSpec, run_dir: str, data: str, python: str) -> None:
        self.spec, self.run_dir, self.data, self.python = spec, run_dir, data, python

    def directory(self, stage: str, key: str) -> str:
        return fsio.join(self.run_dir, "stages", stage, key[:12])

    def _cmd(self, *args: str) -> str:
        return " ".join([self.python, "-m", "vtd_train.cli", *map(shlex.quote, args)])

    def _train_config(self, st: Stage, directory: str, inputs: dict[str, dict]) -> str:
        assert st.train is not None
        cfg = dataclasses.replace(
            st.train,
            name=st.name,
            stage=st.name,
            storage_path=fsio.join(directory, "ray"),
            data=dataclasses.replace(st.train.data, uri=self.data,
                                     **({"pseudo": inputs[st.pseudo]["pseudo"]} if st.pseudo else {})),
            init_checkpoint=inputs[st.init]["checkpoint"] if st.init else None,
        )
        if st.init and "loss_weights" in inputs[st.init]:  # from a sweep: its winning loss weights too
            from vtd_train.model.losses import LossWeights

            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_weights=LossWeights(**inputs[st.init]["loss_weights"])))
        doc = _plain(cfg.to_dict())
        uri = fsio.join(directory, "config.yaml")
        fsio.write_bytes_atomic(uri, yaml.safe_dump(doc, sort_keys=False).encode())
        return uri

    def prepare(self, st: Stage, key: str, inputs: dict[str, dict]) -> Launch:
        d = self.directory(st.name, key)
        if st.kind == "init":
            cmd = self._cmd("model", "init", "--config", self._train_config(st, d, inputs), "--out", fsio.join(d, "checkpoint"))
        elif st.kind == "train":
            cmd = self._cmd("train", "--config", self._train_config(st, d, inputs), "--result-json", fsio.join(d, "result.json"))
        elif st.kind == "tune":
            assert st.search is not None
            search = fsio.join(d, "search.yaml")
            fsio.write_bytes_atomic(search, yaml.safe_dump(_plain(dataclasses.asdict(st.search)), sort_keys=False).encode())
            cmd = self._cmd("tune", "--config", self._train_config(st, d, inputs), "--search", search,
                            "--result-json", fsio.join(d, "result.json"))
        elif st.kind == "pseudo_label":
            args = ["pseudo-label", "--data", self.data, "--out", fsio.join(d, "pseudo"), "--split", "train",
                    "--sets", ",".join(st.sets), "--sem-threshold", str(st.sem_threshold),
                    "--pose-threshold", str(st.pose_threshold)]
            for task, src in sorted(st.checkpoints.items()):
                args += ["--checkpoint", f"{task}={inputs[src]['checkpoint']}"]
            for s, tasks in sorted(st.require.items()):
                args += ["--require", f"{s}={','.join(tasks)}"]
            cmd = self._cmd(*args)
        elif st.kind == "merge":
            args = ["model", "merge", "--base", inputs[st.base]["checkpoint"], "--out", fsio.join(d, "checkpoint")]
            for dec in st.decoders:
                for task in self.spec.stages[dec].trainable:
                    args += ["--decoder", f"{task}={inputs[dec]['checkpoint']}"]
            cmd = self._cmd(*args)
        elif st.kind == "evaluate":
            (src,) = st.needs
            p = self.spec.profile
            args = ["evaluate", "--checkpoint", inputs[src]["checkpoint"], "--data", self.data, "--split", "val",
                    "--out", fsio.join(d, "eval"), "--overlays", str(p.eval_overlays)]
            if p.eval_height is not None:
                args += ["--height", str(p.eval_height)]
            cmd = self._cmd(*args)
        else:  # pragma: no cover - the spec validates kinds
            raise VTDInputError(f"stage {st.name}: unknown kind {st.kind!r}")
        return Launch(entrypoint=cmd, directory=d, resources=st.resources)

    def collect(self, st: Stage, key: str) -> dict[str, Any]:
        """The outputs of a finished attempt, with content hashes; an error names what is missing."""
        d = self.directory(st.name, key)
        if st.kind in ("init", "merge"):
            ck = fsio.join(d, "checkpoint")
            return {"checkpoint": ck, "hash": checkpoint_hash(ck)}
        if st.kind in ("train", "tune"):
            rpath = fsio.join(d, "result.json")
            if not fsio.exists(rpath):
                raise FileNotFoundError(f"{rpath}: the {'sweep' if st.kind == 'tune' else 'training job'} ended "
                                        "without writing its result")
            result = json.loads(fsio.read_bytes(rpath))
            out = {"checkpoint": result["checkpoint"], "hash": checkpoint_hash(result["checkpoint"])}
            if st.kind == "tune":  # the winner, its loss weights (a train stage from it takes them) and the trials
                return {**out, "trial": result["trial"], "vtda": result["vtda"], "loss_weights": result["loss_weights"],
                        "trials": [{k: t[k] for k in ("name", "loss_weights", "vtda")} for t in result["trials"]]}
            return {**out, "global_step": result.get("global_step"), "epoch_losses": result.get("epoch_losses"),
                    "first_step_at": result.get("first_step_at")}
        if st.kind == "pseudo_label":
            root = fsio.join(d, "pseudo")
            return {"pseudo": root, "hash": hash_files([fsio.join(root, "manifest.json")])}
        if st.kind == "evaluate":
            from vtd_train.train.families import evaluation_summary

            mpath = fsio.join(d, "eval", "metrics.json")
            if not fsio.exists(mpath):
                raise FileNotFoundError(f"{mpath}: the evaluation job ended without writing metrics")
            metrics, scores = evaluation_summary(self.spec.family, json.loads(fsio.read_bytes(mpath)), mpath)
            reports = [r for r in (fsio.join(d, "eval", "report.html"), fsio.join(d, "eval", "report.md")) if fsio.exists(r)]
            return {"metrics_file": mpath, "hash": hash_files([mpath]), "metrics": metrics, "scores": scores,
                    "report": reports[0] if reports else None}
        raise VTDInputError(f"stage {st.name}: unknown kind {st.kind!r}")  # pragma: no cover

    @staticmethod
    def still_valid(outputs: dict[str, Any]) -> bool:
        """Whether recorded outputs are still there with the recorded content."""
        try:
            if "checkpoint" in outputs and "metrics_file" not in outputs:
                return checkpoint_hash(outputs["checkpoint"]) == outputs["hash"]
            if "pseudo" in outputs:
                return hash_files([fsio.join(outputs["pseudo"], "manifest.json")]) == outputs["hash"]
            if "metrics_file" in outputs:
                return hash_files([outputs["metrics_file"]]) == outputs["hash"]
        except (FileNotFoundError, OSError, VTDInputError):
            return False
        return False
