"""`cmsd-jobs k8s render SPEC.yaml`: KubeRay manifests for a job spec (the work is in jobs/k8s/render.py)."""

from __future__ import annotations

import click

from jobs.k8s.render import DEFAULT_IMAGE, DEFAULT_SCHEDULE, KINDS, dump_manifests, read_spec, render_manifests


@click.group("k8s")
def k8s() -> None:
    """Kubernetes (KubeRay) manifests for cmsd-jobs."""


@k8s.command("render")
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(KINDS), default="rayjob", show_default=True)
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Container image (see k8s/Dockerfile).")
@click.option("--gpus", type=click.IntRange(min=0), default=None,
              help="GPU worker pods, one GPU each (0: CPU workers). Default: from the spec's execution section.")
@click.option("--schedule", default=DEFAULT_SCHEDULE, show_default=True, help="Cron schedule (raycronjob).")
@click.option("--namespace", default=None, help="Namespace to put in the manifests.")
@click.option("--name", default=None, help="Resource name (default: cmsd-<hash of the spec>).")
def render(spec_path: str, kind: str, image: str, gpus: int | None, schedule: str, namespace: str | None,
           name: str | None) -> None:
    """Print a ConfigMap with SPEC.yaml and a RayJob/RayCronJob that runs it (`kubectl apply -f -`)."""
    try:
        with open(spec_path, encoding="utf-8") as f:
            spec_text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise click.BadParameter(f"cannot read {spec_path}: {err}", param_hint="SPEC.yaml") from err
    try:
        docs = render_manifests(spec_text, kind, image=image, gpus=gpus, schedule=schedule,
                                namespace=namespace, name=name)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if read_spec(spec_text).trust_remote_code:
        click.echo("warning: the spec enables trust_remote_code: model code from the hub will run in the pods",
                   err=True)
    click.echo(dump_manifests(docs), nl=False)
