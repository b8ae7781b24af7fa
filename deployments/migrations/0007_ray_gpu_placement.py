from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("deployments", "0006_canary_rollout")]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="gpu",
            field=models.FloatField(blank=True, help_text="GPUs per instance (ray)", null=True),
        ),
        migrations.AddField(
            model_name="deployment",
            name="placement",
            field=models.JSONField(
                blank=True, default=dict, help_text="node labels every instance must run on (ray)"
            ),
        ),
    ]
