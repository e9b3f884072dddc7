"""The ``vtd`` command line. Thin: parses arguments and calls into the library.

Heavy modules are imported inside each handler so that ``vtd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from data_pipeline.errors import VTDInputError


def _cmd_data_synth(a: argparse.Namespace) -> int:
    if a.format == "cityscapes3d":
        from data_pipeline.cityscapes3d.synth import generate
    else:
        from data_pipeline.bdd100k.synth import generate

    summary = generate(a.out, seed=a.seed, size=a.size)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_data_convert(a: argparse.Namespace) -> int:
    root = _one_of(a.source, a.bdd_root, "the dataset root (SRC or --bdd-root)")
    out = _one_of(a.dest, a.out, "the output (OUT or --out)")
    if a.format == "cityscapes3d":
        from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d

        if a.sets is not None or a.clip_len is not None:
            raise VTDInputError("--sets and --clip-len are BDD100K options; Cityscapes-3D has one image set of single frames")
        manifest = convert_cityscapes3d(Cityscapes3DConvertOptions(
            root=root, out=out, splits=a.splits, shard_size=a.shard_size, workers=a.workers,
            on_error=a.on_error, overwrite=a.overwrite, progress=not a.quiet))
        print(json.dumps(manifest["totals"], indent=2))
        return 0
    from data_pipeline.bdd100k.convert import ConvertOptions, convert

    opts = ConvertOptions(
        bdd_root=root,
        out=out,
        sets=tuple(s for s in (a.sets or "det,seg,track").split(",") if s),
        splits=tuple(s for s in a.splits.split(",") if s),
        shard_size=a.shard_size,
        clip_len=8 if a.clip_len is None else a.clip_len,
        workers=a.workers,
        on_error=a.on_error,
        overwrite=a.overwrite,
        progress=not a.quiet,
    )
    manifest = convert(opts)
    print(json.dumps(manifest["totals"], indent=2))
    return 0


def _one_of(positional: str | None, option: str | None, what: str) -> str:
    if positional and option and positional != option:
        raise VTDInputError(f"{what} given twice: {positional!r} and {option!r}")
    if not (positional or option):
        raise VTDInputError(f"{what} is required")
    return positional or option


def _cmd_data_inspect(a: argparse.Namespace) -> int:
    from data_pipeline.shards.inspect import inspect_shards

    report = inspect_shards(a.uri, pseudo=a.pseudo)
    if a.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        kind = "pseudo-labels " if report.get("kind") == "pseudo" else ""
        for key, s in sorted(report["sets"].items()):
            tasks = ", ".join(f"{t}: {v['samples']} samples / {v['instances']} inst" for t, v in sorted(s["tasks"].items()))
            print(f"{key}: {s['samples']} frames ({s['clips']} clips) — {kind}{tasks}")
            if "pseudo" in s:
                pseudo = ", ".join(f"{t}: {v['samples']} samples / {v['instances']} inst" for t, v in s["pseudo"].items())
                print(f"  pseudo — {pseudo}")
    return 0


def _cmd_data_bench(a: argparse.Namespace) -> int:  # pragma: no cover - thin
    raise SystemExit("use: uv run python benchmarks/loader_bench.py")


def _cmd_demo(a: argparse.Namespace) -> int:
    if a.benchmark == "cityscapes3d":
        from vtd_train.demo_cityscapes3d import run_cityscapes3d_demo

        return run_cityscapes3d_demo(workdir=a.workdir, seed=a.seed, size=a.size or "small")
    from vtd_train.demo import run_demo

    return run_demo(workdir=a.workdir, seed=a.seed, size=a.size or "demo")


class _Parser(argparse.ArgumentParser):
    """Usage errors (a bad or missing argument) as one line, like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"vtd: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vtd", description="VTDNet training service (BDD100K, ten tasks).")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset generation, conversion to shards, inspection").add_subparsers(
        dest="data_command", required=True
    )
    s = data.add_parser("synth", help="generate a BDD100K-format mini dataset")
    s.add_argument("--out", required=True, help="output directory (a BDD100K root)")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--size", choices=("tiny", "demo", "small", "full"), default="tiny",
                   help="tiny / demo / small / full (BDD100K); tiny / small (cityscapes3d)")
    s.add_argument("--format", choices=("bdd100k", "cityscapes3d"), default="bdd100k", help="dataset layout to write")
    s.set_defaults(func=_cmd_data_synth)

    c = data.add_parser("convert", help="convert a BDD100K or Cityscapes-3D root to WebDataset shards")
    c.add_argument("source", nargs="?", default=None, metavar="SRC", help="dataset root (or --bdd-root)")
    c.add_argument("dest", nargs="?", default=None, metavar="OUT", help="output URI (or --out)")
    c.add_argument("--format", choices=("bdd100k", "cityscapes3d"), default="bdd100k", help="layout of the dataset root")
    c.add_argument("--bdd-root", default=None, help="directory holding images/ and labels/")
    c.add_argument("--out", default=None, help="output URI (local path, s3://..., any fsspec URI)")
    c.add_argument("--sets", default=None, help="comma-separated image sets (BDD100K; default det,seg,track)")
    c.add_argument("--splits", default="train,val", help="comma-separated splits")
    c.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    c.add_argument("--clip-len", type=int, default=None, help="frames per tracking clip (BDD100K; default 8)")
    c.add_argument("--workers", type=int, default=1, help="converter processes")
    c.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    c.add_argument("--overwrite", action="store_true", help="replace existing output")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_data_convert)

    i = data.add_parser("inspect", help="count samples and labels by reading the shards (or a pseudo-label family)")
    i.add_argument("uri")
    i.add_argument("--pseudo", default=None, metavar="URI", help="also count the pseudo-labels of this family joined to the shards")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_data_inspect)

    d = sub.add_parser("demo", help="the main job: synth → shards → train → evaluate (bdd100k: the CPF pipeline of "
                       "VTDNet; cityscapes3d: the tiny TaskPrompter, trained vs untrained)")
    d.add_argument("--benchmark", choices=("bdd100k", "cityscapes3d"), default="bdd100k",
                   help="bdd100k: VTDNet, jobs/cpf.yaml; cityscapes3d: TaskPrompter, configs/taskprompter-tiny.yaml")
    d.add_argument("--workdir", default="runs/demo")
    d.add_argument("--seed", type=_seed, default=0, help="the synthetic dataset's seed")
    d.add_argument("--size", choices=("tiny", "demo", "small"), default=None,
                   help="synthetic dataset size (default: demo for bdd100k, small for cityscapes3d)")
    d.set_defaults(func=_cmd_demo)

    _add_optional_commands(sub)
    from orchestrator.cli import add_jobs_commands

    add_jobs_commands(sub)
    from cluster.cli import add_cluster_commands

    add_cluster_commands(sub)
    return p


def _add_optional_commands(sub) -> None:
    """Commands whose implementation lives in the model / evaluation packages."""
    m = sub.add_parser("model", help="model facts").add_subparsers(dest="model_command", required=True)
    info = m.add_parser("info", help="parameter count and GMACs of a model variant")
    info.add_argument("--family", choices=("vtdnet", "taskprompter"), default="vtdnet")
    info.add_argument("--backbone", default="resnet50", help="VTDNet's backbone")
    info.add_argument("--variant", default=None, help="vtdnet: vtdnet (default) | mt | single:TASK; "
                      "taskprompter: paper (default, Swin-B) | tiny | baseline | single:TASK")
    info.add_argument("--height", type=_pixels, default=None, help="input height (default: vtdnet 720, taskprompter "
                      "the variant's input, paper 1024)")
    info.add_argument("--width", type=_pixels, default=None, help="input width (default: vtdnet 1280, taskprompter "
                      "the variant's input, paper 2048)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_model_info)
    mi = m.add_parser("init", help="an untrained checkpoint of a training config's model (seeded as `vtd train` seeds)")
    mi.add_argument("--config", required=True, help="training config (YAML)")
    mi.add_argument("--out", required=True, help="checkpoint directory to write (local path or URI)")
    mi.set_defaults(func=_cmd_model_init)
    mm = m.add_parser("merge", help="one checkpoint from a base and fine-tuned decoders (CPF, appendix H.3)")
    mm.add_argument("--base", required=True, help="checkpoint whose shared parts are kept")
    mm.add_argument("--decoder", action="append", default=[], metavar="TASK=URI", required=True,
                    help="a fine-tuned checkpoint whose TASK decoder is taken (repeat per task)")
    mm.add_argument("--out", required=True, help="checkpoint directory to write")
    mm.set_defaults(func=_cmd_model_merge)

    ev = sub.add_parser("evaluate", help="a checkpoint's metrics on validation shards, with a report: VTDNet: the VTD "
                        "metrics + VTDA; TaskPrompter: mIoU, depth RMSE, mDS (cityscapesscripts) against the paper's table")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (local path or fsspec URI)")
    ev.add_argument("--data", required=True, help="shard root written by `vtd data convert` (any fsspec URI)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--out", default="runs/eval", help="directory for metrics.json and the report")
    ev.add_argument("--address", default=None, help="Ray cluster address; default: run in this process")
    ev.add_argument("--workers", type=int, default=None, help="Ray workers for inference (default: one per work unit, at most 8 and at most the cluster's CPUs)")
    ev.add_argument("--reference", default=None, help="metrics.json to compare against (default: the paper's VTDNet-R50)")
    ev.add_argument("--overlays", type=int, default=4, help="frames rendered as qualitative overlays")
    ev.add_argument("--height", type=_height, default=None,
                    help="test image height in pixels (aspect kept; metrics at the stored resolution), or 'native' "
                         "(default: the largest training scale the checkpoint records, else native)")
    ev.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="a checkpoint's predictions on a split in BDD100K's formats (the toolkit's and "
                        "evaluation server's inputs)")
    pr.add_argument("--checkpoint", required=True, help="checkpoint directory (local path or fsspec URI)")
    pr.add_argument("--data", required=True, help="shard root written by `vtd data convert` (any fsspec URI)")
    pr.add_argument("--split", default="val")
    pr.add_argument("--out", required=True, help="directory for the prediction files (local path or fsspec URI)")
    pr.add_argument("--address", default=None, help="Ray cluster address; default: run in this process")
    pr.add_argument("--workers", type=int, default=None, help="Ray workers for inference (as for `vtd evaluate`)")
    pr.add_argument("--height", type=_height, default=None,
                    help="test image height in pixels, or 'native' (as for `vtd evaluate`; predictions are written "
                         "at the stored resolution)")
    pr.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out")
    pr.set_defaults(func=_cmd_predict)

    tr = sub.add_parser("train", help="train VTDNet on Ray Train (embedded local cluster by default)")
    tr.add_argument("--config", required=True, help="training config (YAML)")
    tr.add_argument("--address", default=None, help="Ray cluster address; default: start a local cluster")
    tr.add_argument("--storage", default=None, help="checkpoint storage URI (overrides the config)")
    tr.add_argument("--name", default=None, help="run name (overrides the config; reuse it to resume)")
    tr.add_argument("--result-json", default=None, metavar="URI",
                    help="write {checkpoint, global_step, ...} of the finished run here (for pipelines)")
    tr.add_argument("--takeover", action="store_true",
                    help="take the run's lease even if another live process holds it (that run then stops)")
    tr.add_argument("--verbose", action="store_true", help="on failure, print the full trace after the one-line error")
    tr.set_defaults(func=_cmd_train)

    tu = sub.add_parser("tune", help="a loss-weight sweep with Ray Tune (ASHA, objective validation VTDA)")
    tu.add_argument("--config", required=True, help="training config (YAML) of every trial")
    tu.add_argument("--search", required=True, help="the sweep (YAML): loss_weights grid, max_concurrent, ASHA settings")
    tu.add_argument("--address", default=None, help="Ray cluster address; default: RAY_ADDRESS inside a Ray job, else a local cluster")
    tu.add_argument("--storage", default=None, help="checkpoint storage URI (overrides the config)")
    tu.add_argument("--name", default=None, help="run name (overrides the config; trials are NAME-<hash>)")
    tu.add_argument("--result-json", default=None, metavar="URI",
                    help="write {checkpoint, loss_weights, vtda, trials} of the sweep here (for pipelines)")
    tu.set_defaults(func=_cmd_tune)

    runs = sub.add_parser("runs", help="training runs in storage").add_subparsers(dest="runs_command", required=True)
    rv = runs.add_parser("verify", help="a run's checkpoints with their integrity, and the one a resume would use")
    rv.add_argument("run", help="the run's directory: STORAGE/NAME (local path or URI)")
    rv.add_argument("--json", action="store_true")
    rv.set_defaults(func=_cmd_runs_verify)

    pl = sub.add_parser("pseudo-label", help="sem / pose pseudo-labels from single-task checkpoints (CPF, paper H.2)")
    pl.add_argument("--checkpoint", action="append", required=True, metavar="TASK=URI",
                    help="a single-task checkpoint per task: sem=URI, pose=URI (repeat the option)")
    pl.add_argument("--data", required=True, help="shard root written by `vtd data convert` (any fsspec URI)")
    pl.add_argument("--out", required=True, help="pseudo-label family root (any fsspec URI)")
    pl.add_argument("--split", default="train")
    pl.add_argument("--sets", default=None, help="comma-separated image sets (default: all of the split)")
    pl.add_argument("--require", action="append", metavar="SET=TASK[,TASK]",
                    help="label only the set's frames labelled for these tasks, e.g. track=mots (repeatable)")
    pl.add_argument("--sem-threshold", type=float, default=0.3, help="pixels below this probability become 255 (ignore)")
    pl.add_argument("--pose-threshold", type=float, default=0.2, help="joints below this confidence are dropped")
    pl.add_argument("--person-threshold", type=float, default=0.3, help="persons scoring below this get no pose")
    pl.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS inside a Ray job, else a local cluster)")
    pl.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per shard, at most 8 and the GPUs or CPUs)")
    pl.add_argument("--batch-size", type=int, default=4, help="frames per model call")
    pl.add_argument("--height", type=_height, default=None,
                    help="inference height, or 'native' (default: each checkpoint's largest training scale)")
    pl.add_argument("--overwrite", action="store_true", help="replace an existing pseudo-label family")
    pl.set_defaults(func=_cmd_pseudo_label)

    sc = sub.add_parser("score", help="VTDA from a metrics JSON file")
    sc.add_argument("metrics", help="JSON object with canonical metric keys")
    sc.set_defaults(func=_cmd_score)


def _cmd_tune(a: argparse.Namespace) -> int:
    from vtd_train.tune import tune_command

    return tune_command(a)


def _cmd_model_info(a: argparse.Namespace) -> int:
    if a.family == "taskprompter":
        from vtd_train.model.info import taskprompter_info

        info = taskprompter_info(variant=a.variant or "paper", height=a.height, width=a.width)
    else:
        from vtd_train.model.info import model_info

        info = model_info(backbone=a.backbone, variant=a.variant or "vtdnet", height=a.height or 720, width=a.width or 1280)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def _cmd_model_init(a: argparse.Namespace) -> int:
    from vtd_train.checkpoint_ops import init_checkpoint

    print(f"vtd model init: wrote {init_checkpoint(a.config, a.out)}")
    return 0


def _cmd_model_merge(a: argparse.Namespace) -> int:
    from vtd_train.checkpoint_ops import merge_checkpoints

    decoders: dict[str, str] = {}
    for item in a.decoder:
        task, sep, uri = item.partition("=")
        if not sep or not task or not uri:
            raise VTDInputError(f"--decoder: expected TASK=URI, got {item!r}")
        if task in decoders:
            raise VTDInputError(f"--decoder: task {task!r} given twice")
        decoders[task] = uri
    summary = merge_checkpoints(a.base, decoders, a.out)
    taken = ", ".join(f"{t} {n}" for t, n in sorted(summary["tensors_from_decoders"].items()))
    print(f"vtd model merge: wrote {a.out}: {summary['tensors']} tensors, from the fine-tuned decoders: {taken}; "
          "every other tensor from the base, all checked")
    return 0


#: The largest image side the CLI accepts (the shard format's label-map limit).
MAX_PIXELS = 16384


def _pixels(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"expected a number of pixels from 1 to {MAX_PIXELS}, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _height(text: str) -> int | str:
    if text == "native":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'native', got {text!r}")
    return value


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from vtd_train.evaluation.evaluate import evaluate_command

    return evaluate_command(a)


def _cmd_predict(a: argparse.Namespace) -> int:
    from vtd_train.evaluation.predict import predict_command

    return predict_command(a)


def _cmd_pseudo_label(a: argparse.Namespace) -> int:
    from vtd_train.pseudo_label import pseudo_label_command

    return pseudo_label_command(a)


def _cmd_train(a: argparse.Namespace) -> int:
    from vtd_train.train.launch import train_command

    return train_command(a)


def _cmd_runs_verify(a: argparse.Namespace) -> int:
    from vtd_train.train.recovery import format_run_report, inspect_run

    report = inspect_run(a.run)
    print(json.dumps(report, indent=2) if a.json else format_run_report(report))
    damaged = any(c["registered"] and not c["intact"] for c in report["checkpoints"])
    return 1 if damaged or report["error"] else 0


def _cmd_score(a: argparse.Namespace) -> int:
    from vtd_train.evaluation.vtda import score_file

    print(json.dumps(score_file(a.metrics), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (VTDInputError, FileNotFoundError, FileExistsError, ConnectionError) as e:
        # User-facing errors (bad input, missing files): one clear line, no traceback.
        print(f"vtd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno is None:  # not the operating system's: a bug, with its traceback
            raise
        # the machine's (a full disk, a denied permission): one line naming the file
        print(f"vtd: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
