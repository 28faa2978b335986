from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise.fields.base import OnDelete
from tortoise import fields
from tortoise.indexes import Index, PartialIndex

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='AuditEvent',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('occurred_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('user_id', fields.CharField(null=True, max_length=128)),
                ('session_id', fields.CharField(null=True, max_length=128)),
                ('kind', fields.CharField(max_length=32)),
                ('reason', fields.CharField(null=True, max_length=64)),
                ('source', fields.CharField(max_length=32)),
                ('detail', fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
            ],
            options={'table': 'audit_events', 'app': 'models', 'indexes': [Index(fields=['user_id', 'at'], name='audit_user_at_idx'), Index(fields=['at'], name='audit_at_idx')], 'pk_attr': 'id', 'table_description': 'Append-only journal of lifecycle changes and access decisions (CONTRACT §5).'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ProcessedEvent',
            fields=[
                ('key', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=300)),
                ('user_id', fields.CharField(max_length=128)),
                ('processed_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={'table': 'processed_events', 'app': 'models', 'indexes': [Index(fields=['processed_at'], name='processed_events_at_idx')], 'pk_attr': 'key', 'table_description': 'De-duplication ledger: an event key seen once is a no-op the second time.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='User',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=128)),
                ('name', fields.CharField(null=True, max_length=256)),
                ('email', fields.CharField(null=True, max_length=320)),
                ('status', fields.CharField(default='disconnected', max_length=16)),
                ('connected_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('disconnected_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('last_activity_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('seen_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('logged_out_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('version', fields.BigIntField(default=0)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={'table': 'users', 'app': 'models', 'indexes': [PartialIndex(fields=['seen_at'], name='users_idle_idx', condition={'status': 'connected'})], 'pk_attr': 'id', 'table_description': "One row a user; ``status`` is derived from the user's sessions inside the same transaction."},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Session',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('user', fields.ForeignKeyField('models.User', source_field='user_id', db_constraint=True, to_field='id', related_name='sessions', on_delete=OnDelete.CASCADE)),
                ('session_id', fields.CharField(max_length=128)),
                ('status', fields.CharField(default='connected', max_length=16)),
                ('started_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('ended_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('end_reason', fields.CharField(null=True, max_length=32)),
                ('last_event_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('ip_address', fields.CharField(null=True, max_length=64)),
                ('source', fields.CharField(default='auth', max_length=32)),
            ],
            options={'table': 'sessions', 'app': 'models', 'unique_together': (('user', 'session_id'),), 'indexes': [PartialIndex(fields=['started_at'], name='sessions_open_idx', condition={'status': 'connected'})], 'pk_attr': 'id', 'table_description': 'A device\'s session; ``session_id`` is ``""`` for the implicit one of events without an id.'},
            bases=['Model'],
        ),
    ]
