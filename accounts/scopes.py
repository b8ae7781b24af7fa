"""What an API token may do. Safe methods need ``read``; each API view names
the scope its writes need."""

READ = "read"
REGISTRY_WRITE = "registry:write"
DEPLOY = "deploy"
MONITORING_WRITE = "monitoring:write"

ALL_SCOPES: dict[str, str] = {
    READ: "Read models, versions, deployments, metrics",
    REGISTRY_WRITE: "Register, promote, approve, archive and delete model versions",
    DEPLOY: "Create, update, roll back and delete deployments",
    MONITORING_WRITE: "Post ground-truth feedback, manage alert rules",
}
