import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the 'admin' superuser on first run (password from CONTROLPLANE_ADMIN_PASSWORD, else random, printed once)."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            self.stdout.write("admin user exists")
            return
        password = settings.CONTROLPLANE_ADMIN_PASSWORD or secrets.token_urlsafe(12)
        user = User.objects.create_superuser("admin", email="", password=password)
        user.user_permissions.add(Permission.objects.get(codename="approve_promotion"))
        if settings.CONTROLPLANE_ADMIN_PASSWORD:
            self.stdout.write(
                "created user 'admin' with the password from CONTROLPLANE_ADMIN_PASSWORD"
            )
        else:
            self.stdout.write(
                f"created user 'admin' with password: {password}  (shown once; change it in the admin)"
            )
