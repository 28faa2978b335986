from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    """First receipts of events without a time of their own (``storage.receipts``): a copy with
    the same ``event_id`` gets back the stamps the first one was given."""

    dependencies = [('models', '0007_session_seen')]

    initial = False

    operations = [
        ops.CreateModel(
            name='EventReceipt',
            fields=[
                ('key', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=300)),
                ('received_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('stamped_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'event_receipts', 'app': 'models', 'indexes': [Index(fields=['received_at'], name='event_receipts_at_idx')], 'pk_attr': 'key', 'table_description': 'The stamps an event without a time of its own was first given (``storage.receipts``).'},
            bases=['Model'],
        ),
    ]
