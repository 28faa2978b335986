"""The authentication service: logs its users in and out by publishing plain JSON events on
RabbitMQ (CONTRACT §1), as any AMQP client would; every publish waits for the broker's confirm.

Each instance owns a pool of users and mixes: a login on one of two devices, a logout of one
device, a logout everywhere (no ``session_id``), and a redelivery of the last event (same
``event_id``: the service must treat it as a no-op).
"""

from __future__ import annotations

import random

from locust import User, constant_throughput, task

from loadtests.locustfiles._common import LEDGER, AmqpPublisher, event, new_user_id

DEVICES = ("web", "mobile")
POOL = 50


class AuthServiceUser(User):
    fixed_count = 1
    wait_time = constant_throughput(20)  # events per second per instance, at most

    def on_start(self) -> None:
        self.publisher = AmqpPublisher(self.environment)
        self.pool = [new_user_id("svc") for _ in range(POOL)]

    def on_stop(self) -> None:
        self.publisher.close()

    def _open_sessions(self, user_id: str) -> set[str]:
        expected = LEDGER.users.get(user_id)
        return expected.sessions if expected is not None else set()

    @task(6)
    def login(self) -> None:
        user_id = random.choice(self.pool)
        self.publisher.publish(event("connected", user_id, session_id=random.choice(DEVICES)))

    @task(3)
    def logout_device(self) -> None:
        candidates = [u for u in self.pool if self._open_sessions(u)]
        if not candidates:
            return
        user_id = random.choice(candidates)
        device = random.choice(sorted(self._open_sessions(user_id)))
        self.publisher.publish(event("disconnected", user_id, session_id=device))

    @task(1)
    def logout_everywhere(self) -> None:
        self.publisher.publish(event("disconnected", random.choice(self.pool)))

    @task(1)
    def redeliver(self) -> None:
        if self.publisher.last is not None:
            self.publisher.publish(self.publisher.last, duplicate=True)
