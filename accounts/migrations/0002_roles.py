"""The role groups. The table here is a frozen copy of ``accounts.permissions.ROLES``
as of this migration; after every ``migrate`` the groups are synced with the
table in code (``accounts.apps``), so later changes need no migration."""

from django.db import migrations, models

ROLES = {
    "viewer": ["accounts.read"],
    "model-developer": ["accounts.read", "accounts.registry_write"],
    "deployer": ["accounts.read", "accounts.deploy", "accounts.monitoring_write"],
    "approver": ["accounts.read", "registry.approve_promotion"],
    "admin": None,  # every permission
}


def create_roles(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    for label in ("accounts", "registry"):
        config = apps.get_app_config(label)
        config.models_module = True  # a migration state stub: let it list its models
        create_permissions(config, verbosity=0, apps=apps)
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, rights in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        if rights is None:
            group.permissions.set(Permission.objects.all())
            continue
        perms = []
        for right in rights:
            app_label, codename = right.split(".")
            perms.append(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        group.permissions.set(perms)


def delete_roles(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("registry", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Rights",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
            ],
            options={
                "permissions": [
                    ("read", "Read models, versions, deployments, metrics and alerts"),
                    (
                        "registry_write",
                        "Register, tag, archive, delete; move aliases no deployment follows",
                    ),
                    (
                        "deploy",
                        "Create, update, roll back, stop deployments; move followed aliases",
                    ),
                    (
                        "monitoring_write",
                        "Post feedback, manage alert rules and drift references",
                    ),
                    ("manage_policies", "Create, change and delete approval policies"),
                    ("view_audit", "Read the audit log"),
                    ("manage_users", "Create users and give them roles"),
                ],
                "managed": False,
                "default_permissions": (),
            },
        ),
        migrations.RunPython(create_roles, delete_roles),
    ]
