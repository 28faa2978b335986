#!/usr/bin/env bash
# /auth/check on a cache hit vs a bare Sanic route, both with 2 workers, same wrk run settings.
# Bounded and local: 127.0.0.1 only, DURATION seconds per target (default 10).
# Needs the local stack (`sessiond stack up`) and wrk (apt-get install -y wrk).
# Usage: loadtests/bench_auth_check.sh [DURATION] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DURATION=${1:-10}
CONNS=${2:-64}
WORKERS=${WORKERS:-2}
REDIS_DB=${BENCH_REDIS_DB:-14}   # a Redis db of its own: the access log grows fast

eval "$($PY -m sessiond.cli stack env)"
export SESSIOND_REDIS_URL="${SESSIOND_REDIS_URL%/*}/${REDIS_DB}"
export SESSIOND_LOG_LEVEL=WARNING SESSIOND_ENV=development
export SESSIOND_JWT_SECRET=${SESSIOND_JWT_SECRET:-bench-secret-that-is-long-enough-for-hs256}
free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  $PY - <<'PYEOF' || true
import os, redis
redis.Redis.from_url(os.environ["SESSIOND_REDIS_URL"]).flushdb()
PYEOF
  rm -rf "$TMP"
}
trap cleanup EXIT

# A connected user in the Redis cache (user:bench-user), as a partition worker leaves it; a cache
# hit never reads PostgreSQL, so the benchmark does not depend on the database's content.
$PY - <<'PYEOF'
import asyncio
from datetime import UTC, datetime
from sessiond.config import get_settings
from storage import cache as c

async def main() -> None:
    s = get_settings()
    cache = c.Cache(c.connect(s), ttl_s=s.cache_ttl_s)
    await cache.client.flushdb()
    now = datetime.now(UTC)
    await cache.sync(c.UserSnapshot(
        user_id="bench-user", status="connected", version=1, email="bench@example.com",
        sessions=["bench"], connected_at=now, seen_at=now))
    assert await cache.get("bench-user") is not None
    await cache.close()

asyncio.run(main())
PYEOF
TOKEN=$($PY -m sessiond.cli token --sub bench-user --sid bench --ttl 3600)

cat > "$TMP/bare_app.py" <<'PYEOF'
from sanic import HTTPResponse, Request, Sanic

def create_app() -> Sanic:
    app = Sanic("bare")
    app.config.ACCESS_LOG = False

    @app.get("/ok")
    async def ok(request: Request) -> HTTPResponse:
        return HTTPResponse(status=200)

    return app
PYEOF

wait_ready() {  # url log
  for _ in $(seq 200); do
    if [ "$(grep -c 'Worker ready' "$2" 2>/dev/null)" -ge "$WORKERS" ] && curl -s -o /dev/null "$1"; then
      sleep 1; return 0
    fi
    sleep 0.1
  done
  echo "not ready: $1" >&2; cat "$2" >&2; return 1
}

run() {  # name url [header]
  echo "== $1"
  if [ $# -ge 3 ]; then
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "$3" "$2"
  else
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$2"
  fi | grep -E "Requests/sec|^ +50%|^ +99%|Non-2xx|Socket errors|requests in"
}

API_PORT=$(free_port)
SESSIOND_LOG_LEVEL=INFO $PY -m sanic api.app:create_app --factory --host 127.0.0.1 \
  --port "$API_PORT" --workers "$WORKERS" --no-motd >"$TMP/api.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$API_PORT/health/live" "$TMP/api.log"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
  "http://127.0.0.1:$API_PORT/auth/check")
[ "$code" = 200 ] || { echo "auth/check answered $code" >&2; exit 1; }
run "/auth/check (cache hit, $WORKERS workers)" "http://127.0.0.1:$API_PORT/auth/check" \
  "Authorization: Bearer $TOKEN"
kill -TERM "${PIDS[0]}"; wait "${PIDS[0]}" || true; PIDS=()

BARE_PORT=$(free_port)
(cd "$TMP" && exec "$OLDPWD/$PY" -m sanic bare_app:create_app --factory --host 127.0.0.1 \
  --port "$BARE_PORT" --workers "$WORKERS" --no-motd >"$TMP/bare.log" 2>&1) &
PIDS+=($!)
wait_ready "http://127.0.0.1:$BARE_PORT/ok" "$TMP/bare.log"
run "bare Sanic route ($WORKERS workers)" "http://127.0.0.1:$BARE_PORT/ok"
