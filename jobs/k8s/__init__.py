"""Kubernetes: KubeRay manifests (RayJob, RayCronJob) rendered from a job spec, for `cmsd-jobs k8s render`.

    render   the manifests: names, schedule, the spec's facts read generically, pods, volumes, YAML output

Kept light: it needs PyYAML only (no torch, no Ray), so rendering works on any machine.
"""
