from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from accounts.scopes import ALL_SCOPES
from accounts.services import api_token_create
from controlplane.lib.datadir import no_database_message
from controlplane.lib.errors import ApplicationError


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it (once) as the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--scope",
            action="append",
            dest="scopes",
            help=f"repeatable; one of {', '.join(ALL_SCOPES)} (default: all)",
        )
        expiry = parser.add_mutually_exclusive_group()
        expiry.add_argument(
            "--expires-in",
            type=int,
            dest="expires_in",
            help="days until it expires (default: CONTROLPLANE_TOKEN_DEFAULT_DAYS, "
            f"now {settings.CONTROLPLANE_TOKEN_DEFAULT_DAYS}, as in the UI)",
        )
        expiry.add_argument("--no-expiry", action="store_true", help="a token that never expires")
        parser.add_argument("--name", default="cli", help="a label for the token")

    def handle(self, *args, username, scopes, expires_in, no_expiry, name, **options):
        if no_expiry:
            expires_in = None
        elif expires_in is None:
            expires_in = settings.CONTROLPLANE_TOKEN_DEFAULT_DAYS
        try:
            user = get_user_model().objects.filter(username=username).first()
        except DatabaseError as exc:  # an empty or unmigrated database: not the server's
            raise CommandError(no_database_message(exc)) from None
        if user is None:
            raise CommandError(f"no user named {username!r}")
        flat = None
        if scopes:
            flat = [s for item in scopes for s in item.replace(",", " ").split()]
        try:
            issued = api_token_create(user=user, name=name, scopes=flat, expires_in_days=expires_in)
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        token = issued.token
        self.stderr.write(
            f"token {token.display_prefix}… for {username}, scopes: {', '.join(token.scopes)}, "
            f"expires: {token.expires_at.isoformat() if token.expires_at else 'never'}"
        )
        self.stdout.write(issued.plaintext)
