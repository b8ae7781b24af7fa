from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiToken(models.Model):
    """A bearer token for the REST API.

    Only a SHA-256 digest of the secret is stored, with a short public key id
    (part of the token itself) to find the row and show it in lists. The
    token text is shown once, at creation.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    key_id = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"
        verbose_name_plural = "API tokens"

    def __str__(self) -> str:
        return f"{self.display_prefix}… ({self.name})"

    @property
    def display_prefix(self) -> str:
        return f"mlcp_{self.key_id}"

    @property
    def is_active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()


class Rights(models.Model):
    """Not a table: the holder of the control plane's custom permissions
    (``accounts.read``, ``accounts.deploy``...), which roles grant. The role
    table is ``accounts.permissions.ROLES``."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("read", "Read models, versions, deployments, metrics and alerts"),
            (
                "registry_write",
                "Register, tag, archive, delete; move aliases no deployment follows",
            ),
            ("deploy", "Create, update, roll back, stop deployments; move followed aliases"),
            ("monitoring_write", "Post feedback, manage alert rules and drift references"),
            ("manage_policies", "Create, change and delete approval policies"),
            ("view_audit", "Read the audit log"),
            ("manage_users", "Create users and give them roles"),
        ]

    def __str__(self) -> str:
        return "rights"


class OidcIdentity(models.Model):
    """The single sign-on subject (the provider's ``sub`` claim) a user signs in as.
    Users are found by it, never by a username or e-mail the provider lets people
    choose, so a provider account cannot take over a local one."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="oidc_identity"
    )
    subject = models.CharField(max_length=255, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_login_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "single sign-on identity"
        verbose_name_plural = "single sign-on identities"

    def __str__(self) -> str:
        return f"{self.subject} → {self.user}"
