import logging

from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    name = "deployments"
    verbose_name = "Deployments"

    def ready(self) -> None:
        from .runtimes import isolation_warning

        warning = isolation_warning("local")
        if warning:
            # Said once per process at start-up, and on every local deployment's page.
            logging.getLogger("deployments").warning("model code is not isolated: %s", warning)
