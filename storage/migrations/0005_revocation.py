from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    """Revocation sources (CONTRACT §8): a user's block (``storage.blocking``)."""

    dependencies = [('models', '0004_reconcile')]

    initial = False

    operations = [
        ops.AddField(
            model_name='User',
            name='blocked_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name='User',
            name='blocked_reason',
            field=fields.CharField(null=True, max_length=32),
        ),
    ]
