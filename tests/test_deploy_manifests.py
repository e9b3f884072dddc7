"""Kubernetes manifests (k8s/): every overlay built with ``kubectl kustomize`` and every object
of its output validated offline, the way an API server with strict field validation would:

- standard kinds against the strict schemas of a pinned Kubernetes version
  (``kubernetes-validate``: unknown fields are errors);
- KubeRay (``ray.io/v1``) and Prometheus-operator (``monitoring.coreos.com/v1``) resources against
  the real CRD schemas in ``../shared/k8s-crds/``, read with Kubernetes structural-schema
  semantics: an object schema has exactly its ``properties`` unless it says
  ``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-int-or-string`` is an integer or a
  string (``cpu: 0.5`` is invalid), ``default`` fills a missing field, ``nullable`` admits null,
  ``x-kubernetes-list-type: map|set`` lists have unique keys / items. CEL rules
  (``x-kubernetes-validations``) are not evaluated;
- then what the files must say: GPUs, /dev/shm, non-root pods, token auth from a Secret, no
  inline credentials, the NetworkPolicy's ports, the RayJob's lifecycle, and the RayJob's
  cluster being the RayCluster's shape.

No cluster is needed. ``kubectl`` is installed with apt-get when missing (as root, like CI).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu")
#: The Kubernetes version the standard kinds are validated against (KubeRay 1.7 supports it).
KUBERNETES_VERSION = "1.33.0"


def _crd_dir() -> Path:
    """The CRD schemas: ``VTD_K8S_CRDS`` when set, else ``shared/k8s-crds`` beside the checkout or
    beside one of its parents (a CI clone may sit deeper than the working copy)."""
    if os.environ.get("VTD_K8S_CRDS"):
        return Path(os.environ["VTD_K8S_CRDS"])
    for base in ROOT.parents:
        if (base / "shared" / "k8s-crds").is_dir():
            return base / "shared" / "k8s-crds"
    return ROOT.parent / "shared" / "k8s-crds"


CRD_DIR = _crd_dir()
CRD_FILES = {
    ("ray.io/v1", "RayCluster"): "raycluster.v1.json",
    ("ray.io/v1", "RayJob"): "rayjob.v1.json",
    ("ray.io/v1", "RayService"): "rayservice.v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.v1.json",
}

_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
#: ``monitoring.coreos.com/v1`` PrometheusRule, the openAPIV3Schema of the Prometheus operator's CRD
#: (v0.82, ``example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml``), without
#: its descriptions: ../shared/k8s-crds/ has no copy of it.
PROMETHEUSRULE_V1 = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "groups": {
                    "type": "array",
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "interval": {"type": "string", "pattern": _DURATION},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "limit": {"type": "integer"},
                            "name": {"type": "string", "minLength": 1},
                            "partial_response_strategy": {"type": "string", "pattern": "^(?i)(abort|warn)?$"},
                            "query_offset": {"type": "string", "pattern": _DURATION},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}],
                                                 "x-kubernetes-int-or-string": True},
                                        "for": {"type": "string", "pattern": _DURATION},
                                        "keep_firing_for": {"type": "string", "minLength": 1, "pattern": _DURATION},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "record": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------------------------------------
# Tools


def ensure_kubectl() -> str:
    """The path of ``kubectl``, installing Debian's package when there is none (root + apt-get)."""
    found = shutil.which("kubectl")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("kubectl is not installed and cannot be installed here (needs root and apt-get): install kubectl >= 1.27")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "kubectl"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return shutil.which("kubectl") or pytest.fail("apt-get installed kubectl but it is not on PATH")


@cache
def kustomize(path: str) -> tuple[dict, ...]:
    """``kubectl kustomize PATH``: the objects it renders."""
    proc = subprocess.run([ensure_kubectl(), "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind: str) -> dict:
    (obj,) = by_kind(objs, kind)
    return obj


# ---------------------------------------------------------------------------------------------
# Structural-schema validation of custom resources


def structural(schema: dict) -> dict:
    """A JSON Schema that accepts what a Kubernetes structural schema accepts."""
    s = {k: v for k, v in schema.items() if k != "description"}
    if "properties" in s:
        s["properties"] = {k: structural(v) for k, v in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = structural(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [structural(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("type") == "object" and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False      # unknown fields are pruned by the API server: an error here
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-list-type") == "set":
        s["uniqueItems"] = True
    return s


def apply_defaults(schema: dict, value):
    """Fill missing fields that have a ``default`` (the API server does so before validating)."""
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def list_map_key_errors(schema: dict, value, path: str = "") -> list[str]:
    """``x-kubernetes-list-type: map``: the items' key tuples must be unique."""
    errors = []
    if isinstance(value, dict) and isinstance(schema.get("properties"), dict):
        for key, sub in schema["properties"].items():
            if key in value:
                errors += list_map_key_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])) for item in value]
            dup = {k for k in keys if keys.count(k) > 1}
            if dup:
                errors.append(f"{path}: duplicate list-map keys {sorted(dup)}")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += list_map_key_errors(schema["items"], item, f"{path}[{i}]")
    return errors


@cache
def crd_schema(api_version: str, kind: str) -> dict:
    if (api_version, kind) == ("monitoring.coreos.com/v1", "PrometheusRule"):
        return PROMETHEUSRULE_V1
    name = CRD_FILES.get((api_version, kind))
    assert name, f"no CRD schema for {api_version} {kind}"
    return json.loads((CRD_DIR / name).read_text())


def validate_object(obj: dict) -> None:
    """Raise ``AssertionError`` naming the object, the field path and the message."""
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = f"{kind}/{obj.get('metadata', {}).get('name')}"
    if api.endswith(("ray.io/v1", "monitoring.coreos.com/v1")) and "." in api.split("/")[0]:
        raw = crd_schema(api, kind)
        doc = apply_defaults(raw, copy.deepcopy(obj))
        schema = structural(raw)
        # the root metadata is an ObjectMeta whatever the CRD says (`type: object`): checked below
        schema["properties"]["metadata"] = {"type": "object"}
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        messages = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]
        messages += list_map_key_errors(raw, doc)
        # the custom resource's own metadata is an ObjectMeta: validate it as the strict schema does
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        try:
            kubernetes_validate.validate(meta, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            messages.append(f"metadata.{'.'.join(map(str, e.path))}: {e.message}")
        assert not messages, f"{name} ({api}) does not validate against its CRD schema:\n  " + "\n  ".join(messages)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{name} ({api}) is invalid for Kubernetes {KUBERNETES_VERSION}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}") from None
    except kubernetes_validate.utils.SchemaNotFoundError as e:
        raise AssertionError(f"{name}: {e.message}") from None


# ---------------------------------------------------------------------------------------------
# Every overlay builds and validates


@pytest.mark.parametrize("path", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_kustomize_output_validates(path):
    objs = kustomize(path)
    kinds = sorted(o["kind"] for o in objs)
    for kind in ("RayCluster", "RayJob", "NetworkPolicy", "PodMonitor", "PrometheusRule", "ConfigMap"):
        assert kind in kinds, f"k8s/{path} renders no {kind}: {kinds}"
    for obj in objs:
        validate_object(obj)


def test_every_manifest_file_is_in_a_kustomization():
    """No YAML under k8s/ that no build renders (it would never be validated or applied)."""
    rendered_sources = set()
    for kust in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        for res in spec.get("resources", []):
            if (kust.parent / res).is_file():
                rendered_sources.add((kust.parent / res).resolve())
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - rendered_sources == set(), f"not in any kustomization: {sorted(files - rendered_sources)}"


# The validator itself: it must reject what the API server would prune or refuse.


def _raycluster() -> dict:
    return copy.deepcopy(one(kustomize("overlays/gpu"), "RayCluster"))


def test_validator_rejects_a_misspelt_kuberay_field():
    rc = _raycluster()
    rc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4          # maxReplicas
    with pytest.raises(AssertionError, match=r"workerGroupSpecs\.0.*'maxReplica' was unexpected"):
        validate_object(rc)
    rc = _raycluster()
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}  # resources
    with pytest.raises(AssertionError, match="'resource' was unexpected"):
        validate_object(rc)


def test_validator_reads_int_or_string_strictly():
    rc = _raycluster()
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 0.5
    with pytest.raises(AssertionError, match="limits.cpu"):
        validate_object(rc)
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "500m"
    validate_object(rc)


def test_validator_rejects_bad_standard_and_monitoring_objects():
    np_ = copy.deepcopy(one(kustomize("overlays/gpu"), "NetworkPolicy"))
    np_["spec"]["ingres"] = []
    with pytest.raises(AssertionError, match="NetworkPolicy/vtd-ray"):
        validate_object(np_)
    rule = copy.deepcopy(one(kustomize("overlays/gpu"), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(AssertionError, match="does not match"):
        validate_object(rule)
    rule = copy.deepcopy(one(kustomize("overlays/gpu"), "PrometheusRule"))
    rule["spec"]["groups"].append(copy.deepcopy(rule["spec"]["groups"][0]))
    with pytest.raises(AssertionError, match="duplicate list-map keys"):
        validate_object(rule)
    pm = copy.deepcopy(by_kind(kustomize("overlays/gpu"), "PodMonitor")[0])
    pm["metadata"]["lables"] = {}
    with pytest.raises(AssertionError, match="lables"):
        validate_object(pm)


# ---------------------------------------------------------------------------------------------
# What the manifests must say


def _pods(rc_spec: dict) -> list[tuple[str, dict]]:
    """(group, pod template spec) of the head and every worker group."""
    return [("head", rc_spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in rc_spec["workerGroupSpecs"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_on_the_rayclusters_shape(overlay):
    objs = kustomize(f"overlays/{overlay}")
    rc, rj = one(objs, "RayCluster"), one(objs, "RayJob")
    assert rj["spec"]["rayClusterSpec"] == rc["spec"], "the overlay's patches must reach the RayJob's cluster too"
    assert rj["spec"]["shutdownAfterJobFinishes"] is True
    assert 0 < rj["spec"]["ttlSecondsAfterFinished"] <= 24 * 3600
    assert rj["spec"].get("activeDeadlineSeconds", 0) > 0
    assert rj["spec"]["submissionMode"] == "K8sJobMode"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_unprivileged_with_writable_volumes_only_where_ray_writes(overlay):
    objs = kustomize(f"overlays/{overlay}")
    rc, rj = one(objs, "RayCluster"), one(objs, "RayJob")
    pods = _pods(rc["spec"]) + [("submitter", rj["spec"]["submitterPodTemplate"]["spec"])]
    for group, pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, group
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", group
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (group, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (group, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (group, c["name"])
            assert "privileged" not in sc
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{group}: Ray writes to /tmp under a read-only root"
            if group != "submitter":
                assert {"/home/ray", "/dev/shm"} <= mounts, group
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if group != "submitter":
            shm = volumes["dshm"]["emptyDir"]
            assert shm["medium"] == "Memory" and "sizeLimit" in shm, group
    auto = rc["spec"]["autoscalerOptions"]["securityContext"]
    assert auto["allowPrivilegeEscalation"] is False and auto["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_equal_limits_and_gpu_shape(overlay):
    rc = one(kustomize(f"overlays/{overlay}"), "RayCluster")
    for group, pod in _pods(rc["spec"]):
        res = pod["containers"][0]["resources"]
        assert res["requests"] == res["limits"], f"{group}: Ray sizes itself from limits; requests differ"
        gpus = res["limits"].get("nvidia.com/gpu")
        if overlay == "gpu" and group != "head":
            assert gpus == 8, group
            assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), group
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
            assert shm == "16Gi", "README 'Shared memory': 12 GB for 8 GPUs x 4 loader workers"
        else:
            assert gpus is None, group
    if overlay == "gpu":
        (group,) = rc["spec"]["workerGroupSpecs"]
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert rc["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_auth_and_credentials_come_from_secrets(overlay):
    objs = kustomize(f"overlays/{overlay}")
    rc, rj = one(objs, "RayCluster"), one(objs, "RayJob")
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": "vtd-ray-auth"}
    assert not by_kind(objs, "Secret"), "Secrets are created by the operator of the cluster, never committed"
    env = {e["name"]: e for e in rj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "vtd-ray-auth", "key": "auth_token"}
    for group, pod in _pods(rc["spec"]):
        refs = [e["secretRef"]["name"] for e in pod["containers"][0].get("envFrom", [])]
        assert refs == ["vtd-storage"], group
    text = yaml.safe_dump_all(objs)
    for pattern in (r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key\s*:", r"(?i)\btoken\s*:\s*\S{20,}", r"(?i)password\s*:"):
        assert not re.search(pattern, text), f"inline credential-like text ({pattern}) in k8s/overlays/{overlay}"


def test_network_policy_limits_dashboard_and_gcs():
    objs = kustomize("overlays/gpu")
    np_ = one(objs, "NetworkPolicy")
    rc = one(objs, "RayCluster")
    ray_labels = np_["spec"]["podSelector"]["matchLabels"]
    for group, pod in [("head", rc["spec"]["headGroupSpec"]["template"])] + [
            (g["groupName"], g["template"]) for g in rc["spec"]["workerGroupSpecs"]]:
        assert ray_labels.items() <= pod["metadata"]["labels"].items(), f"the policy does not select the {group} pods"
    submitter = one(objs, "RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert not ray_labels.items() <= submitter.items(), "the submitter must not pass as a Ray pod (all ports)"
    assert np_["spec"]["policyTypes"] == ["Ingress"]
    reach_6379 = []
    reach_8265 = []
    for rule in np_["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])} or {"*"}
        if "*" in ports or 6379 in ports:
            reach_6379 += rule["from"]
        if "*" in ports or 8265 in ports:
            reach_8265 += rule["from"]
    assert reach_6379 == [{"podSelector": {"matchLabels": ray_labels}}], "GCS: only the cluster's own pods"
    for peer in reach_8265:
        # own pods, this namespace's pods, or the KubeRay operator: never an ipBlock or any namespace's pods
        assert "ipBlock" not in peer
        if "namespaceSelector" in peer:
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}, peer


def test_monitoring_objects_select_the_ray_pods_ports():
    objs = kustomize("overlays/gpu")
    rc = one(objs, "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    monitors = {pm["metadata"]["name"]: pm for pm in by_kind(objs, "PodMonitor")}
    assert {ep["port"] for ep in monitors["vtd-pipeline"]["spec"]["podMetricsEndpoints"]} == {"pipeline-metrics"}
    assert "pipeline-metrics" in head_ports and "metrics" in head_ports
    for g in rc["spec"]["workerGroupSpecs"]:
        assert "metrics" in {p["name"] for p in g["template"]["spec"]["containers"][0]["ports"]}
    sel = monitors["vtd-pipeline"]["spec"]["selector"]["matchLabels"]
    # KubeRay adds ray.io/node-type to the pods; ours come from the template
    assert {k: v for k, v in sel.items() if not k.startswith("ray.io/")}.items() <= head["metadata"]["labels"].items()
    for pm in monitors.values():
        assert pm["metadata"]["labels"]["release"] == one(objs, "PrometheusRule")["metadata"]["labels"]["release"]
    dash = one(objs, "ConfigMap")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = dash["data"].values()
    assert json.loads(body)["uid"] == "vtd-training"
