from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('models', '0002_outbox')]

    initial = False

    operations = [
        ops.AddIndex(
            model_name='User',
            index=Index(fields=['updated_at'], name='users_updated_idx'),
        ),
    ]
