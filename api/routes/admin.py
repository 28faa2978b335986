"""Admin routes (role ``admin`` in the token's ``roles`` claim): inspect and disconnect users,
revoke one session, block and unblock users (``storage.block``).

``DELETE /admin/sessions/<session_id>``: session ids are unique per user only, so ``?user_id=``
names the owner; without it, the owner is looked up, and an id held by several users is refused
(409 ``{"error": "conflict", "reason": "ambiguous_session"}``) until ``user_id`` is given.
Keycloak's session ids are UUIDs, so the lookup is what callers normally rely on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sanic import Blueprint, HTTPResponse
from sanic.exceptions import BadRequest, NotFound
from sanic.response import json
from sanic_ext import openapi

from api.context import Req
from storage import block, queries
from storage.state import Outcome, find_session_owners, force_disconnect, revoke_session

bp = Blueprint("admin", url_prefix="/admin")
ROUTE: Final = "/admin"
ROLE: Final = "admin"
STATUSES: Final = frozenset({"connected", "disconnected"})
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_ID: Final = 128


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def _user(row: dict[str, Any]) -> dict[str, Any]:
    out = _plain(row)
    out["user_id"] = out.pop("id")
    return out


async def _guard(request: Req) -> None:
    await request.app.ctx.access.authorize_role(request.headers.get("authorization"), ROUTE, ROLE)


def _id(value: str, name: str) -> str:
    """A user or session id as events carry them (at most 128 characters, no NUL): anything
    else names nothing, and PostgreSQL text cannot even hold a NUL (a 500 otherwise)."""
    if "\x00" in value or len(value) > MAX_ID:
        raise BadRequest(f"invalid {name}")
    return value


async def _load_user(user_id: str) -> dict[str, Any]:
    row = await queries.user_row(user_id)
    if row is None:
        raise NotFound("no such user")
    return row


@bp.get("/users/<user_id:str>", name="user")
@openapi.summary("A user and their sessions")
@openapi.secured("bearer")
async def get_user(request: Req, user_id: str) -> HTTPResponse:
    await _guard(request)
    user = await _load_user(_id(user_id, "user_id"))
    sessions = await queries.user_sessions(user_id)
    return json({"user": _user(user), "sessions": [_plain(s) for s in sessions]})


@bp.get("/users", name="users")
@openapi.summary("A page of users, ordered by id (keyset pagination)")
@openapi.parameter("status", str, description="connected or disconnected")
@openapi.parameter("limit", int, description=f"1..{MAX_LIMIT}, default {DEFAULT_LIMIT}")
@openapi.parameter("cursor", str, description="next_cursor of the previous page")
@openapi.secured("bearer")
async def list_users(request: Req) -> HTTPResponse:
    await _guard(request)
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {sorted(STATUSES)}")
    try:
        limit = int(request.args.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    cursor = request.args.get("cursor") or None
    if cursor is not None:
        _id(cursor, "cursor")
    page, next_cursor = await queries.users_page(status, cursor, limit)
    return json({"users": [_user(r) for r in page], "next_cursor": next_cursor})


@bp.post("/users/<user_id:str>/disconnect", name="disconnect")
@openapi.summary("End all of a user's sessions, as a disconnected event would")
@openapi.secured("bearer")
async def disconnect(request: Req, user_id: str) -> HTTPResponse:
    await _guard(request)
    await _load_user(_id(user_id, "user_id"))
    outcome = await force_disconnect(user_id, reason="admin", source="admin")
    await request.app.ctx.reconciler.publish(outcome)
    snapshot = outcome.snapshot
    return json(
        {
            "user_id": user_id,
            "status": snapshot.status if snapshot is not None else None,
            "ended_sessions": outcome.ended_sessions,
        }
    )


@bp.delete("/sessions/<session_id:str>", name="revoke_session")
@openapi.summary("End one session; the user stays connected while another session is open")
@openapi.parameter("user_id", str, description="the session's user (required when ambiguous)")
@openapi.secured("bearer")
async def revoke(request: Req, session_id: str) -> HTTPResponse:
    await _guard(request)
    _id(session_id, "session_id")
    user_id = request.args.get("user_id") or None
    if user_id is not None:
        _id(user_id, "user_id")
    if user_id is None:
        owners = await find_session_owners(session_id)
        if not owners:
            raise NotFound("no such session")
        if len(owners) > 1:
            return json({"error": "conflict", "reason": "ambiguous_session"}, status=409)
        user_id = owners[0]
    elif user_id not in await find_session_owners(session_id):
        raise NotFound("no such session")
    outcome = await revoke_session(user_id, session_id, reason="admin", source="admin")
    await request.app.ctx.reconciler.publish(outcome)
    snapshot = outcome.snapshot
    return json(
        {
            "user_id": user_id,
            "session_id": session_id,
            "status": snapshot.status if snapshot is not None else None,
            "ended_sessions": outcome.ended_sessions,
        }
    )


def _block_answer(user_id: str, outcome: Outcome) -> HTTPResponse:
    snapshot = outcome.snapshot
    return json(
        {
            "user_id": user_id,
            "blocked": snapshot.blocked if snapshot is not None else False,
            "status": snapshot.status if snapshot is not None else None,
            "ended_sessions": outcome.ended_sessions,
        }
    )


@bp.post("/users/<user_id:str>/block", name="block")
@openapi.summary("Block a user: end every session (reason blocked), refuse later logins")
@openapi.secured("bearer")
async def block_route(request: Req, user_id: str) -> HTTPResponse:
    """A user never seen may be blocked too: their first login is then refused."""
    await _guard(request)
    _id(user_id, "user_id")
    outcome = await block.block_user(user_id, source="admin")
    await block.mirror(request.app.ctx.redis, outcome)  # first: the first refusal says why
    await request.app.ctx.reconciler.publish(outcome)
    return _block_answer(user_id, outcome)


@bp.post("/users/<user_id:str>/unblock", name="unblock")
@openapi.summary("Lift a user's block (any source); the user logs in again, old tokens stay fenced")
@openapi.secured("bearer")
async def unblock_route(request: Req, user_id: str) -> HTTPResponse:
    await _guard(request)
    await _load_user(_id(user_id, "user_id"))
    outcome = await block.unblock_user(user_id, source="admin")
    await block.mirror(request.app.ctx.redis, outcome)  # first: the first refusal says why
    await request.app.ctx.reconciler.publish(outcome)
    return _block_answer(user_id, outcome)
