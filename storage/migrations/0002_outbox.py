from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields
from tortoise.indexes import Index, PartialIndex

class Migration(migrations.Migration):
    dependencies = [('models', '0001_initial')]

    initial = False

    operations = [
        ops.CreateModel(
            name='OutboxEvent',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('type', fields.CharField(max_length=32)),
                ('event_id', fields.UUIDField(unique=True)),
                ('user_id', fields.CharField(max_length=128)),
                ('session_id', fields.CharField(null=True, max_length=128)),
                ('reason', fields.CharField(null=True, max_length=32)),
                ('occurred_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('sent_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'outbox', 'app': 'models', 'indexes': [Index(fields=['sent_at', 'id'], name='outbox_sent_idx'), Index(fields=['user_id', 'sent_at', 'id'], name='outbox_user_sent_idx')], 'pk_attr': 'id', 'table_description': 'A lifecycle event out (CONTRACT §7), written in the transaction of its state change and'},
            bases=['Model'],
        ),
        ops.AddIndex(
            model_name='Session',
            index=Index(fields=['session_id'], name='sessions_session_id_idx'),
        ),
        ops.AlterModelOptions(
            name='User',
            options={'table': 'users', 'app': 'models', 'indexes': [PartialIndex(fields=['seen_at'], name='users_idle_idx', condition={'status': 'connected'})], 'pk_attr': 'id', 'table_description': "One row a user; ``status`` is derived from the user's sessions in the same transaction."},
        ),
    ]
