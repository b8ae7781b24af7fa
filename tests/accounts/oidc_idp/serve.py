"""Run the test identity provider: ``python -m tests.accounts.oidc_idp.serve SPEC.json``.

The spec names the port, the database and key files, the client (id, secret,
redirect URI) and the users with their groups. It migrates, creates them, then
serves on 127.0.0.1 until killed."""

from __future__ import annotations

import json
import os
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        sys.stderr.write("idp: " + (format % args) + "\n")


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ["IDP_DATABASE"] = spec["database"]
    os.environ["IDP_KEY_FILE"] = spec["key_file"]
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.accounts.oidc_idp.settings"
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from oauth2_provider.models import Application

    call_command("migrate", verbosity=0)
    for person in spec["users"]:
        user = User.objects.create_user(
            username=person["username"], password=person["password"], email=person["email"]
        )
        for name in person["groups"]:
            user.groups.add(Group.objects.get_or_create(name=name)[0])
    Application.objects.create(
        name="control plane",
        client_id=spec["client_id"],
        client_secret=spec["client_secret"],
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=spec["redirect_uri"],
        algorithm=Application.RS256_ALGORITHM,
        skip_authorization=True,
    )
    server = make_server(
        "127.0.0.1",
        spec["port"],
        get_wsgi_application(),
        server_class=_Server,
        handler_class=_Quiet,
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
