import getpass
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.permissions import ROLES
from accounts.services import user_create
from controlplane.lib.errors import ApplicationError


class Command(BaseCommand):
    help = "Create a user with one or more roles (audited). The password comes from a file or a prompt."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--role",
            action="append",
            dest="roles",
            required=True,
            help=f"repeatable; one of {', '.join(ROLES)}",
        )
        parser.add_argument(
            "--password-file",
            dest="password_file",
            help="read the password from this file (first line); prompted when absent",
        )

    def handle(self, *args, username, roles, password_file, **options):
        unknown = [r for r in roles if r not in ROLES]
        if unknown:  # before prompting for a password
            raise CommandError(
                f"unknown role(s): {', '.join(unknown)}; roles are: {', '.join(ROLES)}"
            )
        if password_file:
            try:
                lines = Path(password_file).read_text().splitlines()
            except OSError as exc:
                raise CommandError(f"cannot read {password_file}: {exc.strerror}") from None
            password = lines[0] if lines else ""
        else:
            password = getpass.getpass(f"Password for {username}: ")
            if password != getpass.getpass("Password (again): "):
                raise CommandError("the passwords do not match")
        try:
            user = user_create(username=username, password=password, roles=roles)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"created {user.get_username()} with role(s) {', '.join(sorted(set(roles)))}"
        )
