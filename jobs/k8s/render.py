"""KubeRay manifests for one job spec (`cmsd-jobs k8s render`, jobs/cli/k8s.py).

`render_manifests(spec_text, kind, ...)` is a pure function that returns the documents (a ConfigMap holding
the spec text unchanged, then a RayJob or a RayCronJob); the Click command only reads the file and prints
them. The pods follow k8s/README.md: non-root, read-only root filesystem with emptyDirs for /tmp, /tmp/ray
and $HOME, no capabilities, requests and limits on every container, and secrets only by reference.

Output: an object-store URI in the spec (`output.dir: s3://...`) is used as it is; a local path is put on
the results PersistentVolumeClaim (mounted at /mnt/results on the head and every worker, so it must be
ReadWriteMany), and a path outside that mount is replaced by `--out /mnt/results/jobs`.

The job's cluster has a fixed size (KubeRay keeps the worker count and replaces a lost pod); the
autoscaling cluster for interactive use is k8s/base/raycluster.yaml.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

RAY_VERSION = "2.60.0"  # the Ray pinned in k8s/Dockerfile; KubeRay wants rayVersion to match the image
DEFAULT_IMAGE = "cmsd-jobs:0.1.0"
DEFAULT_SCHEDULE = "0 2 * * *"  # nightly at 02:00 in the operator's time zone
CRON_DEADLINE_S = 6 * 3600  # a scheduled run is stopped after 6 hours, before the next night's starts
KINDS = ("rayjob", "raycronjob")
SPEC_DIR = "/etc/cmsd"
RESULTS_MOUNT = "/mnt/results"
RESULTS_CLAIM = "cmsd-results"
DEFAULT_ACTORS = 2  # jobs.batch.spec.ExecutionSpec.actors (not imported: that would load torch)
HOME = "/home/cmsd"
UID = 1000
MAX_NAME = {"rayjob": 47, "raycronjob": 36}  # KubeRay's limits, so that derived RayCluster names fit
MAX_CONFIGMAP_BYTES = 1_000_000  # a ConfigMap holds at most 1 MiB
HF_TOKEN_SECRET = "hf-token"  # optional Secret with key `token`
OBJECT_STORE_SECRET = "cmsd-object-store"  # optional Secret of AWS_* variables for s3:// output

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one container (requests == limits, as Ray recommends for its pods)."""

    cpu: str
    memory: str
    gpu: int = 0
    request_cpu: str | None = None  # a lower CPU request (sidecars), else == cpu

    def to_dict(self) -> dict[str, Any]:
        limits: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        if self.gpu:
            limits["nvidia.com/gpu"] = self.gpu
        return {"requests": {**limits, "cpu": self.request_cpu or self.cpu}, "limits": limits}


HEAD = Resources(cpu="2", memory="8Gi")
GPU_WORKER = Resources(cpu="8", memory="32Gi", gpu=1)
CPU_WORKER = Resources(cpu="4", memory="16Gi")
SUBMITTER = Resources(cpu="1", memory="1Gi", request_cpu="500m")


@dataclass(frozen=True)
class RenderSettings:
    """What `k8s render` may change; validated when built (ValueError names the bad value)."""

    kind: str = "rayjob"
    image: str = DEFAULT_IMAGE
    gpus: int | None = None  # GPU worker pods, one GPU each; 0 = CPU workers; None = from the spec's execution
    schedule: str = DEFAULT_SCHEDULE  # raycronjob only
    namespace: str | None = None
    name: str | None = None  # None = cmsd-<hash of the spec text>

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image must be a non-empty image reference, got {self.image!r}")
        if self.gpus is not None and (isinstance(self.gpus, bool) or self.gpus < 0):
            raise ValueError(f"gpus must be an integer >= 0, got {self.gpus!r}")
        check_cron(self.schedule)
        if self.namespace is not None and not (_DNS1035.match(self.namespace) and len(self.namespace) <= 63):
            raise ValueError(f"namespace must be a DNS label (lower case, digits, '-'), got {self.namespace!r}")
        if self.name is not None:
            check_name(self.name, self.kind)


def check_name(name: str, kind: str) -> None:
    """KubeRay's rule: a DNS-1035 label short enough for the RayCluster names derived from it."""
    limit = MAX_NAME[kind]
    if not _DNS1035.match(name) or len(name) > limit:
        raise ValueError(f"name must be a DNS-1035 label of at most {limit} characters for a {kind} "
                         f"(lower case letters, digits, '-', starting with a letter), got {name!r}")


# ---------------------------------------------------------------- cron

_CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))  # minute hour day-of-month month day-of-week
_CRON_NAMES = ({}, {}, {}, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
               {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())})
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every ((\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+)$")


def check_cron(schedule: str) -> None:
    """Accept what KubeRay accepts (robfig/cron ParseStandard): 5 fields or a descriptor; no TZ prefix."""
    if not isinstance(schedule, str) or "TZ" in schedule:
        raise ValueError(f"schedule must be a cron expression without TZ= (5 fields), got {schedule!r}")
    text = schedule.strip()
    if text in _CRON_DESCRIPTORS or _EVERY.match(text):
        return
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"schedule needs 5 fields (minute hour day month weekday), got {schedule!r}")
    for part, bounds, names in zip(parts, _CRON_FIELDS, _CRON_NAMES):
        for item in part.split(","):
            if not _cron_item_ok(item.upper(), bounds, names):
                raise ValueError(f"schedule field {part!r} is not valid in {schedule!r}")


def _cron_item_ok(item: str, bounds: tuple[int, int], names: dict[str, int]) -> bool:
    lo, hi = bounds
    span, _, step = item.partition("/")
    if step and not (step.isdigit() and int(step) > 0):
        return False
    if span in ("*", "?"):
        return True
    start, dash, end = span.partition("-")
    values = [names.get(v, int(v) if v.isdigit() else -1) for v in ((start, end) if dash else (start,))]
    return all(lo <= v <= hi for v in values) and values[0] <= values[-1]


# ---------------------------------------------------------------- the spec, read generically


@dataclass(frozen=True)
class SpecFacts:
    """The few things render reads from a job spec (jobs/batch/spec.py); the spec text itself is embedded unchanged."""

    out: str | None  # output.dir (or a plain `out`/`output` string), as written
    corpus: str | None  # corpus.path, as written
    actors: int  # execution.actors
    gpus_per_actor: float | None  # execution.gpus_per_actor; None: 1 when the cluster has a GPU
    trust_remote_code: bool  # any `trust_remote_code: true` in the spec

    @property
    def object_store(self) -> bool:
        return bool(self.out and _URI.match(self.out) and not self.out.startswith("file://"))

    @property
    def out_on_volume(self) -> bool:
        return _on_volume(self.out)

    @property
    def needs_volume(self) -> bool:
        """The results volume is mounted unless every path is elsewhere (an object store)."""
        return not self.object_store or _on_volume(self.corpus)

    def workers(self, gpus: int | None) -> tuple[int, bool]:
        """(worker pods, whether they hold a GPU each) for `--gpus` or, when None, for the spec."""
        if gpus is not None:
            return (gpus, True) if gpus > 0 else (self.actors, False)
        if self.gpus_per_actor == 0:
            return self.actors, False
        return max(1, math.ceil(self.actors * (self.gpus_per_actor or 1))), True


def _on_volume(path: str | None) -> bool:
    return bool(path) and (path == RESULTS_MOUNT or path.startswith(RESULTS_MOUNT + "/"))


def read_spec(spec_text: str) -> SpecFacts:
    try:
        data = yaml.safe_load(spec_text)
    except yaml.YAMLError as err:
        raise ValueError(f"the spec is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError("the spec must be a YAML mapping (corpus, task, models, decode, execution, output)")
    out = data.get("output", data.get("out"))
    if isinstance(out, dict):
        out = out.get("dir")
    if out is not None and not isinstance(out, str):
        raise ValueError(f"the spec's output.dir must be a path or URI, got {out!r}")
    execution = data.get("execution") or {}
    if not isinstance(execution, dict):
        raise ValueError("the spec's execution section must be a mapping")
    actors = execution.get("actors", DEFAULT_ACTORS)
    if not isinstance(actors, int) or isinstance(actors, bool) or actors < 1:
        raise ValueError(f"the spec's execution.actors must be an integer >= 1, got {actors!r}")
    gpa = execution.get("gpus_per_actor")
    if gpa is not None and (not isinstance(gpa, (int, float)) or isinstance(gpa, bool) or not 0 <= gpa <= 1):
        raise ValueError(f"render puts one GPU in each worker pod: execution.gpus_per_actor must be in [0, 1], "
                         f"got {gpa!r}")
    corpus = data.get("corpus")
    corpus = corpus.get("path") if isinstance(corpus, dict) else corpus
    return SpecFacts(out=out, corpus=corpus if isinstance(corpus, str) else None, actors=actors, gpus_per_actor=gpa,
                     trust_remote_code=_finds_true(data, "trust_remote_code"))


def _finds_true(node: Any, key: str) -> bool:
    if isinstance(node, dict):
        return node.get(key) is True or any(_finds_true(v, key) for v in node.values())
    if isinstance(node, list):
        return any(_finds_true(v, key) for v in node)
    return False


# ---------------------------------------------------------------- rendering


def render_manifests(spec_text: str, kind: str, *, image: str = DEFAULT_IMAGE, gpus: int | None = None,
                     schedule: str = DEFAULT_SCHEDULE, namespace: str | None = None,
                     name: str | None = None) -> list[dict[str, Any]]:
    """The ConfigMap with the spec and the RayJob (or RayCronJob) that runs it; ValueError on bad input."""
    settings = RenderSettings(kind=kind, image=image, gpus=gpus, schedule=schedule, namespace=namespace, name=name)
    facts = read_spec(spec_text)
    if len(spec_text.encode()) > MAX_CONFIGMAP_BYTES:
        raise ValueError("the spec is larger than a ConfigMap can hold (1 MiB)")
    name = settings.name or "cmsd-" + hashlib.sha256(spec_text.encode()).hexdigest()[:8]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, settings, "config", suffix="-spec"),
                  "data": {"spec.yaml": spec_text}}
    job = rayjob_spec(settings, facts, config_map=f"{name}-spec")
    if settings.kind == "rayjob":
        main = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(name, settings, "job"), "spec": job}
    else:
        job["activeDeadlineSeconds"] = CRON_DEADLINE_S
        main = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": _meta(name, settings, "nightly"),
                "spec": {"schedule": settings.schedule.strip(), "jobTemplate": job}}
    if facts.trust_remote_code:
        main["metadata"]["annotations"] = {"cmsd.io/trust-remote-code": "true"}
    return json.loads(json.dumps([config_map, main]))  # plain data: no dict shared between places or with this module


def entrypoint(facts: SpecFacts) -> str:
    args = ["cmsd-jobs", "submit", f"{SPEC_DIR}/spec.yaml", "--address", "auto"]
    if not facts.object_store and not facts.out_on_volume:
        args += ["--out", f"{RESULTS_MOUNT}/jobs"]
    return shlex.join(args)


def rayjob_spec(settings: RenderSettings, facts: SpecFacts, config_map: str) -> dict[str, Any]:
    """A RayJob spec: its own RayCluster, deleted 5 minutes after the job ends."""
    return {
        "entrypoint": entrypoint(facts),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 300,  # keep the finished cluster 5 minutes (GPUs idle), then delete it
        "backoffLimit": 0,  # the job system resumes from finished shards itself (`cmsd-jobs resume`)
        "submitterPodTemplate": _submitter(settings.image),
        "rayClusterSpec": ray_cluster_spec(settings, facts, config_map),
    }


def ray_cluster_spec(settings: RenderSettings, facts: SpecFacts, config_map: str) -> dict[str, Any]:
    """A fixed-size cluster (the job's own): KubeRay keeps its worker count and replaces a lost pod."""
    workers, gpu = facts.workers(settings.gpus)
    use_claim = facts.needs_volume
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "headGroupSpec": _head_group(settings.image, config_map, use_claim),
        "workerGroupSpecs": [_worker_group(settings.image, workers, gpu=gpu, use_claim=use_claim)],
    }


def _meta(name: str, settings: RenderSettings, component: str, suffix: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name + suffix, "labels": {"app.kubernetes.io/name": "cmsd-jobs",
                                                     "app.kubernetes.io/instance": name,
                                                     "app.kubernetes.io/component": component}}
    if settings.namespace:
        meta["namespace"] = settings.namespace
    return meta


# ---------------------------------------------------------------- pods

CONTAINER_SECURITY = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _env() -> list[dict[str, Any]]:
    """No secret values: the hub token comes from an optional Secret; HF_HUB_OFFLINE is left to the user."""
    return [{"name": "HOME", "value": HOME},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token",
                                                                  "optional": True}}}]


def _scratch_volumes(shm: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable places under a read-only root: (volumes, mounts). `ray-logs` is the name KubeRay shares."""
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
               {"name": "ray-logs", "emptyDir": {"sizeLimit": "8Gi"}},
               {"name": "home", "emptyDir": {"sizeLimit": "16Gi"}},  # model cache ($HOME/.cache)
               {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "ray-logs", "mountPath": "/tmp/ray"},
              {"name": "home", "mountPath": HOME}, {"name": "shared-mem", "mountPath": "/dev/shm"}]
    return volumes, mounts


def _results_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"name": "results", "persistentVolumeClaim": {"claimName": RESULTS_CLAIM}},
            {"name": "results", "mountPath": RESULTS_MOUNT})


def _ray_container(name: str, image: str, resources: Resources, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "env": _env(),
            "envFrom": [{"secretRef": {"name": OBJECT_STORE_SECRET, "optional": True}}],
            "resources": resources.to_dict(), "securityContext": CONTAINER_SECURITY, "volumeMounts": mounts}


def _head_group(image: str, config_map: str, use_claim: bool) -> dict[str, Any]:
    volumes, mounts = _scratch_volumes(shm="2Gi")
    volumes.append({"name": "spec", "configMap": {"name": config_map}})
    mounts.append({"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})
    if use_claim:
        volume, mount = _results_volume()
        volumes.append(volume)
        mounts.append(mount)
    container = _ray_container("ray-head", image, HEAD, mounts)
    container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                          {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"}]
    return {"rayStartParams": {"num-cpus": "0"},  # no decoding on the head: it runs the driver only
            "template": {"spec": {"securityContext": POD_SECURITY, "containers": [container],
                                  "volumes": volumes}}}


def _worker_group(image: str, replicas: int, gpu: bool, use_claim: bool) -> dict[str, Any]:
    volumes, mounts = _scratch_volumes(shm="8Gi")
    if use_claim:
        volume, mount = _results_volume()
        volumes.append(volume)
        mounts.append(mount)
    pod: dict[str, Any] = {"securityContext": POD_SECURITY, "automountServiceAccountToken": False,
                           "containers": [_ray_container("ray-worker", image, GPU_WORKER if gpu else CPU_WORKER,
                                                         mounts)],
                           "volumes": volumes}
    if gpu:
        pod["tolerations"] = [GPU_TOLERATION]
    return {"groupName": "gpu-workers" if gpu else "cpu-workers", "replicas": replicas, "minReplicas": replicas,
            "maxReplicas": replicas, "rayStartParams": {}, "template": {"spec": pod}}


def _submitter(image: str) -> dict[str, Any]:
    """The pod that runs `ray job submit` and follows the logs; KubeRay fills in its command."""
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}, {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
    container = {"name": "ray-job-submitter", "image": image, "env": [{"name": "HOME", "value": HOME}],
                 "resources": SUBMITTER.to_dict(), "securityContext": CONTAINER_SECURITY, "volumeMounts": mounts}
    return {"spec": {"restartPolicy": "Never", "securityContext": POD_SECURITY,
                     "automountServiceAccountToken": False, "containers": [container], "volumes": volumes}}


# ---------------------------------------------------------------- output


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded spec) as literal blocks, so that the manifest stays readable."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # kubectl reads anchors, but people reading the manifest should not have to


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
