from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields
from tortoise.indexes import PartialIndex

class Migration(migrations.Migration):
    """Revocation sources (CONTRACT §8): a user's block, and each session's own sign of life."""

    dependencies = [('models', '0003_users_updated')]

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
        ops.AddField(
            model_name='Session',
            name='last_seen_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddIndex(
            model_name='Session',
            index=PartialIndex(fields=['last_seen_at'], name='sessions_idle_idx', condition={'status': 'connected'}),
        ),
    ]
