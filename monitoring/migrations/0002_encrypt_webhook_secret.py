from django.db import migrations

import controlplane.lib.fields


def encrypt_existing(apps, schema_editor):
    """Secrets written before this migration are plaintext: encrypt them in place (raw SQL,
    because the field now decrypts what it reads)."""
    from controlplane.lib.fields import decrypt, encrypt

    table = schema_editor.quote_name("monitoring_alertrule")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT id, webhook_secret FROM {table} WHERE webhook_secret <> ''")
        for pk, value in cursor.fetchall():
            if decrypt(value) is None:
                cursor.execute(
                    f"UPDATE {table} SET webhook_secret = %s WHERE id = %s", [encrypt(value), pk]
                )


def decrypt_existing(apps, schema_editor):
    from controlplane.lib.fields import decrypt

    table = schema_editor.quote_name("monitoring_alertrule")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT id, webhook_secret FROM {table} WHERE webhook_secret <> ''")
        for pk, value in cursor.fetchall():
            plain = decrypt(value)
            if plain is not None:
                cursor.execute(f"UPDATE {table} SET webhook_secret = %s WHERE id = %s", [plain, pk])


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0001_initial"),
    ]

    operations = [
        migrations.AlterField(
            model_name="alertrule",
            name="webhook_secret",
            field=controlplane.lib.fields.EncryptedTextField(
                blank=True, help_text="HMAC-SHA256 key of the webhook body (encrypted at rest)"
            ),
        ),
        migrations.RunPython(encrypt_existing, decrypt_existing),
    ]
