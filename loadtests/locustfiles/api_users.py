"""Clients of the protected API. Each owns a user that the auth service logged in (it publishes
the ``connected`` event itself at start) and calls ``/auth/check`` and ``/api/me`` with its
token; a share of its requests carry an expired token (401 ``expired``), a tampered one (401
``bad_signature``) or the token of a user who logged out (403 ``not_connected``). Any other
answer is a failure.
"""

from __future__ import annotations

import time

from locust import between, task

from loadtests.locustfiles._common import (
    AmqpPublisher,
    SessiondUser,
    event,
    expired_token,
    mint,
    new_user_id,
    option,
    report,
    tampered,
)


class ApiUser(SessiondUser):
    weight = 1
    wait_time = between(0.01, 0.1)

    def on_start(self) -> None:
        self.user_id = new_user_id("api")
        self.gone_id = new_user_id("gone")
        self.token = mint(self.user_id, sid="web")
        self.expired = expired_token(self.user_id, sid="web")
        self.tampered = tampered(self.token)
        self.gone_token = mint(self.gone_id)
        publisher = AmqpPublisher(self.environment)
        try:
            publisher.publish(event("connected", self.user_id, session_id="web"))
            publisher.publish(event("connected", self.gone_id))
            publisher.publish(event("disconnected", self.gone_id))
            self.gone_since = time.perf_counter()
        finally:
            publisher.close()
        bound_s = float(option(self.environment, "grant_bound_ms", 15000.0)) / 1000
        started = time.perf_counter()
        granted = self.poll("/auth/check", self.token, until=200, bound_s=bound_s, label="wait")
        report(
            self.environment,
            "connected → granted (API user start)",
            started,
            failure=None if granted else f"not granted within {bound_s}s",
        )

    @task(10)
    def auth_check(self) -> None:
        self.call("/auth/check")

    @task(5)
    def me(self) -> None:
        self.call("/api/me")

    @task(1)
    def expired_token(self) -> None:
        self.call("/auth/check", token=self.expired, expect=401, reason="expired", label="expired")

    @task(1)
    def tampered_token(self) -> None:
        self.call(
            "/api/me", token=self.tampered, expect=401, reason="bad_signature", label="tampered"
        )

    @task(1)
    def logged_out_token(self) -> None:
        # The logout travels through the pipeline like any event: within the revocation bound a
        # 200 is still allowed; after it, only 403 is.
        bound_s = float(option(self.environment, "revocation_bound_ms", 2000.0)) / 1000
        if time.perf_counter() - self.gone_since < bound_s:
            return
        self.call(
            "/auth/check",
            token=self.gone_token,
            expect=403,
            reason="not_connected",
            label="logged out",
        )
