from django.apps import AppConfig


class ControlplaneConfig(AppConfig):
    name = "controlplane"
    verbose_name = "Control plane"

    def ready(self) -> None:
        from controlplane.lib import schema  # noqa: F401  registers the OpenAPI auth extension
