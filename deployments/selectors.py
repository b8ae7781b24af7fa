from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from controlplane.lib.errors import NotFound

from .models import Deployment, DeploymentEvent, Instance, Revision, Rollout


def deployment_list() -> QuerySet[Deployment]:
    return (
        Deployment.objects.filter(deleted=False)
        .select_related(
            "model", "desired_revision__model_version", "serving_revision__model_version"
        )
        .prefetch_related(
            Prefetch("instances", queryset=Instance.objects.select_related("revision")),
            Prefetch("rollouts", queryset=Rollout.objects.select_related("revision", "baseline")),
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


FAILED_REVISION_LOGS = 3  # failed revisions whose servers' logs are listed after they stopped


def deployment_logs(*, deployment: Deployment, tail: int) -> list[dict]:
    """The log of every instance, and of the instances of the last failed revisions, which
    are stopped and their rows gone, from what the runtime kept (``failed: true``)."""
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
                "name": f"{deployment.name}-r{inst.revision.number}-{inst.ordinal}",
                "revision": inst.revision.number,
                "ordinal": inst.ordinal,
                "failed": False,
                "logs": text,
            }
        )
    listed = {(item["revision"], item["ordinal"]) for item in out}
    failed = deployment.revisions.filter(state=Revision.State.FAILED).order_by("-number")
    for revision in failed[:FAILED_REVISION_LOGS]:
        try:
            runtime = get_runtime(revision.spec.get("runtime", deployment.runtime))
        except RuntimeError_:
            continue
        if not hasattr(runtime, "instance_logs"):
            continue
        for ordinal in range(int(revision.spec.get("replicas", 1))):
            if (revision.number, ordinal) in listed:
                continue
            name = f"{deployment.name}-r{revision.number}-{ordinal}"
            try:
                text = runtime.instance_logs(name, tail=tail)
            except RuntimeError_ as exc:
                text = f"(logs unavailable: {exc})"
            if text:
                out.append(
                    {
                        "instance": f"{deployment.name} r{revision.number}#{ordinal}",
                        "name": name,
                        "revision": revision.number,
                        "ordinal": ordinal,
                        "failed": True,
                        "logs": text,
                    }
                )
    return out
