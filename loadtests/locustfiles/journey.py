"""The whole journey of one login, measured: a ``connected`` event, requests granted, a
``disconnected`` event, requests refused. Two custom metrics (request type ``JOURNEY``) record
how long each transition took through RabbitMQ → ingress → partition actor → PostgreSQL → Redis:
``connected → granted`` and ``disconnected → refused`` (the revocation delay), each a failure
beyond its bound (``--grant-bound-ms``, ``--revocation-bound-ms``).
"""

from __future__ import annotations

import time

from locust import constant, task

from loadtests.locustfiles._common import (
    AmqpPublisher,
    SessiondUser,
    event,
    mint,
    new_user_id,
    option,
    report,
)


class JourneyUser(SessiondUser):
    fixed_count = 1
    wait_time = constant(0.2)

    def on_start(self) -> None:
        self.publisher = AmqpPublisher(self.environment)

    def on_stop(self) -> None:
        self.publisher.close()

    @task
    def journey(self) -> None:
        env = self.environment
        grant_s = float(option(env, "grant_bound_ms", 15000.0)) / 1000
        revoke_s = float(option(env, "revocation_bound_ms", 2000.0)) / 1000
        user_id = new_user_id("journey")
        self.token = mint(user_id, sid="web")

        started = time.perf_counter()
        if not self.publisher.publish(event("connected", user_id, session_id="web")):
            return
        granted = self.poll("/auth/check", self.token, until=200, bound_s=grant_s, label="journey")
        report(
            env,
            "connected → granted",
            started,
            failure=None if granted else f"not granted within {grant_s}s",
        )
        if not granted:
            return
        for _ in range(3):
            self.call("/auth/check", label="journey")
        self.call("/api/me", label="journey")

        started = time.perf_counter()
        if not self.publisher.publish(event("disconnected", user_id, session_id="web")):
            return
        refused = self.poll("/auth/check", self.token, until=403, bound_s=revoke_s, label="journey")
        report(
            env,
            "disconnected → refused",
            started,
            failure=None if refused else f"still granted after {revoke_s}s",
        )
        self.call("/api/me", expect=403, reason="not_connected", label="journey after logout")
