from django.apps import AppConfig
from django.db.models.signals import post_migrate


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and API tokens"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_login_failed

        from .login import on_user_login_failed

        user_login_failed.connect(on_user_login_failed, dispatch_uid="accounts.login_failed_audit")
        post_migrate.connect(_sync_roles, sender=self, dispatch_uid="accounts.roles_sync")


def _sync_roles(sender, using="default", verbosity: int = 0, **kwargs) -> None:
    # After every migrate, so a change to the role table (or a new app's
    # permissions, which the admin role gets) takes effect.
    from .permissions import roles_sync

    roles_sync(verbosity=verbosity)
