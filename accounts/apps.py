from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and API tokens"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_login_failed

        from .login import on_user_login_failed

        user_login_failed.connect(on_user_login_failed, dispatch_uid="accounts.login_failed_audit")
