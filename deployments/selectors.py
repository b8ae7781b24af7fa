from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from controlplane.lib.errors import NotFound

from .models import Deployment, DeploymentEvent, Instance, Revision


def deployment_list() -> QuerySet[Deployment]:
    return (
        Deployment.objects.filter(deleted=False)
        .select_related(
            "model", "desired_revision__model_version", "serving_revision__model_version"
        )
        .prefetch_related(
            Prefetch("instances", queryset=Instance.objects.select_related("revision"))
        )
        .order_by("name")
    )


def deployment_get(*, name: str) -> Deployment:
    deployment = deployment_list().filter(name=name).first()
    if deployment is None:
        raise NotFound(f"deployment {name!r} not found")
    return deployment


def revision_list(*, deployment: Deployment) -> QuerySet[Revision]:
    return deployment.revisions.select_related("model_version", "created_by").order_by("-number")


def event_list(*, deployment: Deployment, limit: int = 200) -> list[DeploymentEvent]:
    return list(deployment.events.select_related("revision")[:limit])


def model_versions_in_use(*, model_name: str) -> set[int]:
    """Versions that a deployment wants or serves: they must not be deleted."""
    used: set[int] = set()
    for desired, serving in Deployment.objects.filter(
        model__name=model_name, deleted=False
    ).values_list(
        "desired_revision__model_version__version", "serving_revision__model_version__version"
    ):
        used.update(v for v in (desired, serving) if v is not None)
    return used


def deployment_logs(*, deployment: Deployment, tail: int) -> list[dict]:
    from .runtimes import RuntimeError_, get_runtime

    out = []
    for inst in deployment.instances.select_related("revision").order_by(
        "revision__number", "ordinal"
    ):
        try:
            text = (
                get_runtime(inst.runtime).logs(inst.runtime_id, tail=tail)
                if inst.runtime_id
                else ""
            )
        except RuntimeError_ as exc:
            text = f"(logs unavailable: {exc})"
        out.append(
            {
                "instance": str(inst),
                "revision": inst.revision.number,
                "ordinal": inst.ordinal,
                "logs": text,
            }
        )
    return out
