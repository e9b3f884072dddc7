"""The pipeline as data: ``jobs/*.yaml`` → :class:`PipelineSpec` (stages, their dependencies and
their resolved configs), validated at load with errors that name the file, the stage and the key.

File layout (``jobs/cpf.yaml`` is the annotated example)::

    pipeline: cpf                      # name; the default run name is <pipeline>-<profile>
    stages:
      <name>:
        kind: init | train | tune | pseudo_label | merge    # a taskprompter pipeline: init, train
        needs: [<stage>, ...]          # extra dependencies (init/inputs imply theirs)
        init: <stage>                  # train: start from that stage's checkpoint
        trainable: [<task>, ...]       # train: only these tasks' decoders train, the rest is frozen
        lr_scale: 0.1                  # train: × the profile's learning rate (fine-tuning)
        pseudo: <stage>                # train: join that pseudo_label stage's labels
        search: {...}                  # tune: a loss-weight sweep of the stage's training
                                       # (vtd_train/tune.py); its output is the best trial's
                                       # checkpoint (init / trainable / pseudo as for train)
        train: {...}                   # train/init: training-config keys (configs/tiny.yaml schema)
        foreach: {<task>: {...}}       # expand into <name>_<task>, "{task}" substituted, the
                                       # mapping's value merged into the stage's train.data
        checkpoints: {sem: <stage>, pose: <stage>}   # pseudo_label: the models that label
        sets: [det, track]             # pseudo_label: image sets to label
        require: {track: [mots]}       # pseudo_label: only frames labelled for these
        base: <stage>                  # merge: shared parts from here ...
        decoders: [<stage>, ...]       # ... and each of these stages' trainable decoders
        evaluate: true                 # also evaluate the stage's checkpoint on validation
        retries: 2                     # attempts after the first failure (default: profile's)
        resources: {entrypoint_num_cpus: 0, entrypoint_num_gpus: 0}   # the Ray job's driver
        enabled: true                  # false: not run (a profile's stages.<name>.enabled wins)
    profiles:
      <profile>:
        data: URI                      # shard root written by `vtd data convert`
        storage: URI                   # runs live under <storage>/<run>/
        base: {...}                    # training-config keys shared by every stage
        stages: {<stage>: {...}}       # per-stage training-config overrides (a foreach stage's
                                       # name applies to all its expansions), `enabled`, `lr_scale`
        retries, retry_backoff_s, poll_s, max_parallel, eval_height, eval_overlays

The training stages of a pipeline build one model family (``model.family``: ``vtdnet``, as
``jobs/cpf.yaml``, or ``taskprompter``, as ``jobs/taskprompter.yaml``); tasks, decoders and
frozen prefixes are checked against that family's model, built on the meta device.

A stage's training config is ``base`` ⊕ the stage's ``train`` ⊕ the profile's override for the
stage, validated by :func:`vtd_train.train.config.train_config_from_dict` (the same schema as
``vtd train``; there is no second one). Storage, run name and input checkpoints are filled in
when the stage runs (:mod:`orchestrator.stages`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.bdd100k.format import TASKS
from data_pipeline.cityscapes3d.format import TASKS as CS_TASKS
from data_pipeline.errors import VTDInputError
from vtd_train.model.config import read_yaml_mapping
from vtd_train.train.config import IMAGE_SETS, TrainConfig, train_config_from_dict
from vtd_train.tune import SearchConfig, search_config_from_dict

STAGE_KINDS = ("init", "train", "tune", "pseudo_label", "merge")
#: Task names a pipeline file may use (BDD100K's for VTDNet, Cityscapes-3D's for TaskPrompter);
#: a training stage's are checked against its model's tasks once its config is built.
KNOWN_TASKS = tuple(dict.fromkeys(TASKS + CS_TASKS))
PSEUDO_TASKS = ("sem", "pose")
#: Keys a stage may have, per kind (beyond the common ones).
_COMMON = {"kind", "needs", "evaluate", "retries", "resources", "enabled", "foreach"}
_KIND_KEYS = {
    "init": {"train"},
    "train": {"train", "init", "trainable", "lr_scale", "pseudo"},
    "tune": {"train", "init", "trainable", "lr_scale", "pseudo", "search"},
    "pseudo_label": {"checkpoints", "sets", "require", "sem_threshold", "pose_threshold"},
    "merge": {"base", "decoders"},
}
_PROFILE_KEYS = {"data", "storage", "base", "stages", "retries", "retry_backoff_s", "poll_s", "max_parallel",
                 "eval_height", "eval_overlays", "description"}
#: Data and storage URIs while validating a stage's training config at load: the real ones
#: (the profile's, or --data / --storage) are filled in when the stage runs; a profile's own
#: URIs may need a store package (s3fs) that the machine loading the file does not have.
_PLACEHOLDER = "/nonexistent/vtd-pipeline-placeholder"


@dataclass(frozen=True)
class StageResources:
    """The Ray job's entrypoint resources (its driver process). Training workers ask for their
    own through the stage's ``resources`` training-config section."""

    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, resolved for one profile."""

    name: str
    kind: str
    needs: tuple[str, ...]
    train: TrainConfig | None = None
    init: str | None = None
    trainable: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()
    pseudo: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    sets: tuple[str, ...] = ()
    require: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sem_threshold: float = 0.3
    pose_threshold: float = 0.2
    base: str | None = None
    decoders: tuple[str, ...] = ()
    search: SearchConfig | None = None
    evaluate: bool = False
    retries: int = 2
    resources: StageResources = field(default_factory=StageResources)

    def describe(self) -> dict[str, Any]:
        """The stage as plain data: what its cache key hashes (with its inputs' hashes)."""
        d = dataclasses.asdict(self)
        if self.train is not None:
            # filled in per run: the run's own paths must not change the key
            t = d["train"]
            t.pop("name"), t.pop("storage_path"), t.pop("init_checkpoint")
            t["data"].pop("uri")
            t["data"].pop("pseudo", None)
        d.pop("retries")  # retrying differently is not a different result
        return d


@dataclass(frozen=True)
class Profile:
    name: str
    data: str
    storage: str
    retries: int = 2
    retry_backoff_s: float = 10.0
    poll_s: float = 5.0
    max_parallel: int = 4
    eval_height: int | str | None = None
    eval_overlays: int = 2
    description: str = ""


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline file resolved for one profile: stages in a topological order. ``family``: the
    model family its training stages build (one per pipeline; :mod:`vtd_train.train.families`
    says what that changes: stage kinds, evaluation metrics, report columns)."""

    source: str
    name: str
    profile: Profile
    stages: dict[str, Stage]
    family: str = "vtdnet"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _substitute(value: Any, task: str) -> Any:
    if isinstance(value, str):
        return value.replace("{task}", task)
    if isinstance(value, list):
        return [_substitute(v, task) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, task): _substitute(v, task) for k, v in value.items()}
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise VTDInputError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _tasks(value: Any, where: str, known: tuple[str, ...] = KNOWN_TASKS) -> tuple[str, ...]:
    tasks = _names(value, where)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise VTDInputError(f"{where}: unknown task(s) {bad}; tasks are {list(known)}")
    return tasks


def _expand(raw: dict, source: str) -> dict[str, dict]:
    """``foreach`` stages → one stage per task (``<name>_<task>``); the others as they are."""
    out: dict[str, dict] = {}
    for name, st in raw.items():
        where = f"{source}: stages.{name}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise VTDInputError(f"{where}: stage names are letters, digits, '_' and '-', got {name!r}")
        if not isinstance(st, dict):
            raise VTDInputError(f"{where}: expected a mapping, got {st!r}")
        if "foreach" not in st:
            out[name] = dict(st, _template=name)
            continue
        each = st["foreach"]
        if not isinstance(each, dict) or not each:
            raise VTDInputError(f"{where}.foreach: expected a mapping task -> training data overrides, got {each!r}")
        _tasks(list(each), f"{where}.foreach")
        for task, data in each.items():
            if data is not None and not isinstance(data, dict):
                raise VTDInputError(f"{where}.foreach.{task}: expected a mapping of data keys, got {data!r}")
            body = _substitute({k: v for k, v in st.items() if k != "foreach"}, task)
            body["train"] = _merge(body.get("train") or {}, {"data": data or {}})
            full = f"{name}_{task}"
            if full in raw or full in out:
                raise VTDInputError(f"{where}.foreach: expands to {full!r}, which is already a stage")
            out[full] = dict(body, _template=name)
    return out


def _profile(raw: Any, name: str, source: str) -> tuple[Profile, dict, dict]:
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise VTDInputError(f"{source}: profiles: expected a mapping of profile name -> settings")
    if name not in profiles:
        raise VTDInputError(f"{source}: no profile {name!r}; profiles are {sorted(profiles)}")
    p = profiles[name]
    where = f"{source}: profiles.{name}"
    if not isinstance(p, dict):
        raise VTDInputError(f"{where}: expected a mapping, got {p!r}")
    unknown = sorted(set(p) - _PROFILE_KEYS)
    if unknown:
        raise VTDInputError(f"{where}: unknown key(s) {unknown}; known: {sorted(_PROFILE_KEYS)}")
    for key in ("data", "storage"):
        if not isinstance(p.get(key), str) or not p[key]:
            raise VTDInputError(f"{where}.{key}: required (a local path or URI), got {p.get(key)!r}")
    base = p.get("base") or {}
    overrides = p.get("stages") or {}
    for key, v in (("base", base), ("stages", overrides)):
        if not isinstance(v, dict):
            raise VTDInputError(f"{where}.{key}: expected a mapping, got {v!r}")
    kw = {k: p[k] for k in ("retries", "retry_backoff_s", "poll_s", "max_parallel", "eval_height", "eval_overlays",
                            "description") if k in p}
    for k in ("retries", "max_parallel", "eval_overlays"):
        if k in kw and (not isinstance(kw[k], int) or isinstance(kw[k], bool) or kw[k] < (1 if k == "max_parallel" else 0)):
            raise VTDInputError(f"{where}.{k}: expected an integer >= {1 if k == 'max_parallel' else 0}, got {kw[k]!r}")
    for k in ("retry_backoff_s", "poll_s"):
        if k in kw and (not isinstance(kw[k], (int, float)) or kw[k] < 0):
            raise VTDInputError(f"{where}.{k}: expected a number of seconds >= 0, got {kw[k]!r}")
    eh = kw.get("eval_height")
    if eh is not None and eh != "native" and (not isinstance(eh, int) or eh < 1):
        raise VTDInputError(f"{where}.eval_height: expected pixels or 'native', got {eh!r}")
    return Profile(name=name, data=p["data"], storage=p["storage"], **kw), base, overrides


def _train_config(data: dict, where: str) -> TrainConfig:
    data = _merge(data, {"data": {"uri": _PLACEHOLDER}, "storage_path": _PLACEHOLDER})
    return train_config_from_dict(data, source=where)


def _model_preset(base_preset: Any, variant: str) -> str:
    """A stage's ``model.variant`` (``single:sem``...) in the profile's model family: ``tiny``
    profiles use the tiny presets (``tiny:single:sem``), the others the paper's."""
    tiny = isinstance(base_preset, str) and base_preset.startswith("tiny")
    return f"tiny:{variant}" if tiny else variant


#: meta-device models by (family, model config), read-only: see :func:`_meta_model`
_META_MODELS: dict[tuple[str, str], Any] = {}


def _meta_model(cfg: TrainConfig):
    """``cfg``'s model on the meta device, built once per model config in this process and only
    read (module names and structure): a pipeline's stages share a few model configs, and the
    tiny profile's checks built 20 models, 3.5 s of a `vtd jobs status`."""
    key = (cfg.family, repr(cfg.model))
    if key not in _META_MODELS:
        from vtd_train.train.families import meta_model

        _META_MODELS[key] = meta_model(cfg)
    return _META_MODELS[key]


def decoder_freeze(cfg: TrainConfig, trainable: tuple[str, ...], where: str) -> tuple[str, ...]:
    """The module-name prefixes to freeze so that only ``trainable`` tasks' decoders train
    (everything else, shared parts included, frozen), as few prefixes as the module tree allows;
    the decoders are the model family's own (``model.decoder(task)``)."""
    model = _meta_model(cfg)
    names: set[str] = set()
    ids = {id(m): n for n, m in model.named_modules()}
    for t in trainable:
        try:
            mods = model.decoder(t)
        except KeyError:
            raise VTDInputError(f"{where}: trainable task {t!r} has no decoder in this {cfg.family} model "
                                f"(tasks: {list(cfg.model.tasks)})") from None
        if not mods and t != "mots":
            raise VTDInputError(f"{where}: trainable task {t!r} has no decoder")
        names.update(ids[id(m)] for m in mods)
    if not names:
        raise VTDInputError(f"{where}: trainable names no decoder with parameters ({list(trainable)})")
    frozen: list[str] = []

    def walk(module, prefix: str) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}{child_name}"
            if full in names:
                continue
            if any(n.startswith(full + ".") for n in names):
                walk(child, full + ".")
            elif any(True for _ in child.parameters()):
                frozen.append(full)

    walk(model, "")
    return tuple(frozen)


def _stage_override(overrides: dict, name: str, template: str) -> dict:
    """The profile's training-config override of stage ``name`` (its ``foreach`` template's,
    then its own), without ``enabled`` and ``lr_scale`` (stage keys a profile may set too)."""
    over = _merge(overrides.get(template) or {}, overrides.get(name) or {}) if name != template else (overrides.get(name) or {})
    return {k: v for k, v in over.items() if k not in ("enabled", "lr_scale")}


def _stage_lr_scale(st: dict, overrides: dict, name: str, template: str) -> Any:
    """The stage's ``lr_scale``: the profile's for the stage, its ``foreach`` template's, or the
    stage's own (``None``: none)."""
    for key in (name, template):
        if isinstance(overrides.get(key), dict) and "lr_scale" in overrides[key]:
            return overrides[key]["lr_scale"]
    return st.get("lr_scale")


def _stage(name: str, st: dict, stages: dict[str, dict], base: dict, overrides: dict, profile: Profile,
           source: str, templates: dict[str, list[str]]) -> Stage:
    where = f"{source}: stages.{name}"
    kind = st.get("kind")
    if kind not in STAGE_KINDS:
        raise VTDInputError(f"{where}.kind: must be one of {list(STAGE_KINDS)}, got {kind!r}")
    allowed = _COMMON | _KIND_KEYS[kind] | {"_template"}
    unknown = sorted(set(st) - allowed)
    if unknown:
        raise VTDInputError(f"{where}: unknown key(s) {unknown} for a {kind} stage; known: {sorted(allowed - {'_template'})}")

    def ref(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in stages:
            raise VTDInputError(f"{where}.{key}: unknown stage {value!r}; stages are {sorted(stages)}")
        if value == name:
            raise VTDInputError(f"{where}.{key}: a stage cannot depend on itself")
        return value

    def refs(key: str, value: Any) -> list[str]:
        """Stage names; a ``foreach`` stage's name stands for all its expansions."""
        out: list[str] = []
        for n in _names(value, f"{where}.{key}"):
            out += [ref(key, x) for x in templates[n]] if n in templates and n not in stages else [ref(key, n)]
        return out

    needs = refs("needs", st.get("needs"))
    kw: dict[str, Any] = {}
    if kind in ("init", "train", "tune"):
        raw_train = st.get("train") or {}
        if not isinstance(raw_train, dict):
            raise VTDInputError(f"{where}.train: expected a mapping of training-config keys, got {raw_train!r}")
        over = _stage_override(overrides, name, st["_template"])
        merged = _merge(_merge(base, raw_train), over)
        model = merged.get("model") or {}
        if "variant" in model:
            variant = model.pop("variant")
            model["preset"] = _model_preset((base.get("model") or {}).get("preset"), variant)
            merged["model"] = model
        merged.setdefault("stage", name)
        scale = _stage_lr_scale(st, overrides, name, st["_template"])
        if scale is not None:
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1:
                raise VTDInputError(f"{where}.lr_scale: expected a number in (0, 1], got {scale!r}")
            cfg0 = _train_config(merged, where)
            merged = _merge(merged, {"optimizer": {"lr": cfg0.optimizer.lr * float(scale)}})
        cfg = _train_config(merged, where)
        trainable = _tasks(st.get("trainable"), f"{where}.trainable")
        if getattr(cfg.data, "tasks", None) is not None:
            missing = [t for t in cfg.data.tasks if t not in cfg.model.tasks]
            if missing:
                raise VTDInputError(f"{where}.train.data.tasks: {missing} not among the model's tasks {list(cfg.model.tasks)}")
        freeze = tuple(cfg.freeze)
        if trainable:
            if cfg.freeze:
                raise VTDInputError(f"{where}: give either trainable or train.freeze, not both")
            freeze = decoder_freeze(cfg, trainable, f"{where}.trainable")
        if freeze:
            # the training config's own check: every prefix names parameters of the model
            from vtd_train.train.optim import check_freeze_prefixes

            try:
                check_freeze_prefixes(_meta_model(cfg), freeze)
            except VTDInputError as e:
                raise VTDInputError(f"{where}.train.freeze: {e}") from None
        cfg = dataclasses.replace(cfg, freeze=freeze)
        kw.update(train=cfg, trainable=trainable, freeze=freeze)
        if kind == "tune":
            kw["search"] = search_config_from_dict(st.get("search"), source=f"{where}.search")
        if kind in ("train", "tune"):
            if st.get("init") is not None:
                kw["init"] = ref("init", st["init"])
                needs.append(kw["init"])
            if st.get("pseudo") is not None:
                kw["pseudo"] = ref("pseudo", st["pseudo"])
                if stages[kw["pseudo"]].get("kind") != "pseudo_label":
                    raise VTDInputError(f"{where}.pseudo: stage {kw['pseudo']!r} is not a pseudo_label stage")
                needs.append(kw["pseudo"])
    elif kind == "pseudo_label":
        cks = st.get("checkpoints")
        if not isinstance(cks, dict) or not cks:
            raise VTDInputError(f"{where}.checkpoints: expected a mapping task -> stage, e.g. {{sem: baseline_sem}}")
        for task, s in cks.items():
            if task not in PSEUDO_TASKS:
                raise VTDInputError(f"{where}.checkpoints: pseudo-labels are made for {list(PSEUDO_TASKS)}, got {task!r}")
            needs.append(ref(f"checkpoints.{task}", s))
        kw["checkpoints"] = dict(cks)
        sets = _names(st.get("sets"), f"{where}.sets") or IMAGE_SETS
        bad = [s for s in sets if s not in IMAGE_SETS]
        if bad:
            raise VTDInputError(f"{where}.sets: unknown image set(s) {bad}; sets are {list(IMAGE_SETS)}")
        kw["sets"] = sets
        req = st.get("require") or {}
        if not isinstance(req, dict):
            raise VTDInputError(f"{where}.require: expected a mapping set -> [task, ...], got {req!r}")
        kw["require"] = {s: _tasks(v, f"{where}.require.{s}", TASKS) for s, v in req.items()}  # BDD100K's sets
        for k in ("sem_threshold", "pose_threshold"):
            if k in st:
                v = st[k]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                    raise VTDInputError(f"{where}.{k}: expected a number in [0, 1], got {v!r}")
                kw[k] = float(v)
    elif kind == "merge":
        kw["base"] = ref("base", st.get("base"))
        decs = tuple(refs("decoders", st.get("decoders")))
        if not decs:
            raise VTDInputError(f"{where}.decoders: list the fine-tuning stages whose decoders are merged")
        for d in decs:
            if stages[d].get("kind") != "train" or not stages[d].get("trainable"):
                raise VTDInputError(f"{where}.decoders: stage {d!r} is not a train stage with `trainable` decoders")
        kw["decoders"] = decs
        needs += [kw["base"], *decs]
    ev = st.get("evaluate", False)
    if not isinstance(ev, bool):
        raise VTDInputError(f"{where}.evaluate: expected true/false, got {ev!r}")
    if ev and kind == "pseudo_label":
        raise VTDInputError(f"{where}.evaluate: a pseudo_label stage has no checkpoint to evaluate")
    retries = st.get("retries", profile.retries)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise VTDInputError(f"{where}.retries: expected an integer >= 0, got {retries!r}")
    res = st.get("resources") or {}
    if not isinstance(res, dict) or set(res) - {"entrypoint_num_cpus", "entrypoint_num_gpus"}:
        raise VTDInputError(f"{where}.resources: expected {{entrypoint_num_cpus, entrypoint_num_gpus}}, got {res!r}")
    for k, v in res.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise VTDInputError(f"{where}.resources.{k}: expected a number >= 0, got {v!r}")
    return Stage(name=name, kind=kind, needs=tuple(dict.fromkeys(needs)), evaluate=ev, retries=retries,
                 resources=StageResources(**{k: float(v) for k, v in res.items()}), **kw)


def _toposort(stages: dict[str, Stage], source: str) -> dict[str, Stage]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            raise VTDInputError(f"{source}: stages form a cycle: {' -> '.join(cycle)}")
        state[n] = 1
        for d in stages[n].needs:
            visit(d, path + [n])
        state[n] = 2
        order.append(n)

    for n in stages:
        visit(n, [])
    return {n: stages[n] for n in order}


def pipeline_from_dict(raw: Any, *, profile: str, source: str = "<pipeline>") -> PipelineSpec:
    if not isinstance(raw, dict):
        raise VTDInputError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"pipeline", "stages", "profiles", "description"})
    if unknown:
        raise VTDInputError(f"{source}: unknown top-level key(s) {unknown}; known: description, pipeline, profiles, stages")
    name = raw.get("pipeline")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise VTDInputError(f"{source}: pipeline: a name of letters, digits, '-' and '_' is required, got {name!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise VTDInputError(f"{source}: stages: expected a non-empty mapping of stage name -> stage")
    prof, base, overrides = _profile(raw, profile, source)
    expanded = _expand(stages_raw, source)
    known = set(expanded) | set(stages_raw)
    bad = sorted(set(overrides) - known)
    if bad:
        raise VTDInputError(f"{source}: profiles.{profile}.stages: unknown stage(s) {bad}; stages are {sorted(expanded)}")
    enabled = {}
    for n, st in expanded.items():
        en = st.pop("enabled", True)
        for key in (st["_template"], n):  # a profile turns a stage (or a foreach family) on or off
            if isinstance(overrides.get(key), dict) and "enabled" in overrides[key]:
                en = overrides[key]["enabled"]
        if not isinstance(en, bool):
            raise VTDInputError(f"{source}: stages.{n}.enabled: expected true/false, got {en!r}")
        if en:
            enabled[n] = st
    templates: dict[str, list[str]] = {}
    for n, st in enabled.items():
        if st["_template"] != n:
            templates.setdefault(st["_template"], []).append(n)
    built = {n: _stage(n, st, enabled, base, overrides, prof, source, templates) for n, st in enabled.items()}
    family = _family(built, source)
    return PipelineSpec(source=source, name=name, profile=prof, stages=_toposort(built, source), family=family)


def _family(stages: dict[str, Stage], source: str) -> str:
    """The one model family the pipeline's training stages build (``vtdnet`` when none trains),
    and a check that every stage kind is one that family's pipelines have."""
    from vtd_train.train.families import STAGE_KINDS as KINDS_OF

    of = {n: st.train.family for n, st in stages.items() if st.train is not None}
    families = sorted(set(of.values()))
    if len(families) > 1:
        first = {f: next(n for n, g in of.items() if g == f) for f in families}
        raise VTDInputError(f"{source}: a pipeline trains one model family; "
                            + ", ".join(f"stages.{n} builds {f}" for f, n in first.items()))
    family = families[0] if families else "vtdnet"
    for n, st in stages.items():
        if st.kind not in KINDS_OF[family]:
            raise VTDInputError(f"{source}: stages.{n}.kind: {st.kind!r} is not a stage of a {family} pipeline "
                                f"(its kinds: {list(KINDS_OF[family])})")
    return family


def load_pipeline(path: str, *, profile: str) -> PipelineSpec:
    """Read and validate a pipeline file (local path or URI) for ``profile``."""
    return pipeline_from_dict(read_yaml_mapping(path, what="pipeline"), profile=profile, source=path)
