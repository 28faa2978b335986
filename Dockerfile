# syntax=docker/dockerfile:1.7
# One image for every sessiond process; the command picks the role:
#   docker run IMAGE api | worker | scheduler | migrate | publish ...
# Targets: `runtime` (default, the last stage) for clusters, `dev` for Tilt (see Tiltfile).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- builder: resolve and install dependencies into a self-contained venv -----------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every runtime dependency ships manylinux wheels for CPython 3.11 (asyncpg, uvloop, hiredis,
# httptools, cryptography), so no compiler is needed even here.
COPY pyproject.toml README.md ./
COPY sessiond ./sessiond
COPY actors ./actors
COPY api ./api
COPY storage ./storage
RUN pip install .

# --- runtime-base: what ships; no pip caches, no compilers, no source tree besides /app ----------
FROM ${PYTHON_IMAGE} AS runtime-base
ARG APP_UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SESSIOND_API_HOST=0.0.0.0
RUN groupadd --system --gid ${APP_UID} sessiond \
 && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sessiond
COPY --from=builder /opt/venv /opt/venv
# /app shadows the copy installed in the venv (PYTHONPATH comes first on sys.path): the two are
# identical in a built image, and Tilt's live_update syncs source into /app.
WORKDIR /app
COPY --from=builder /src/sessiond ./sessiond
COPY --from=builder /src/actors ./actors
COPY --from=builder /src/api ./api
COPY --from=builder /src/storage ./storage
RUN python -m compileall -q /app
USER ${APP_UID}:${APP_UID}
EXPOSE 8000
ENTRYPOINT ["sessiond"]
CMD ["api"]

# --- dev: for Tilt only. Source owned by the app user so live_update can write it, and a wrapper
# that re-runs the command in place (a container restart would discard the synced files). --------
FROM runtime-base AS dev
ARG APP_UID=10001
USER root
RUN chown -R ${APP_UID}:${APP_UID} /app
COPY --chmod=0555 <<'WRAPPER' /usr/local/bin/tilt-run
#!/bin/sh
# tilt-run CMD...      run CMD; exit with its status unless a restart was requested
# tilt-run --restart   ask the running CMD to stop (SIGTERM) and start again
set -u
state="${TMPDIR:-/tmp}/tilt-run"
if [ "${1:-}" = "--restart" ]; then
  [ -f "$state.pid" ] || { echo "tilt-run: nothing to restart" >&2; exit 1; }
  : > "$state.restart"
  kill -TERM "$(cat "$state.pid")"
  exit 0
fi
child=""
stop() { rm -f "$state.restart"; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null; }
trap stop TERM INT
while :; do
  rm -f "$state.restart"
  "$@" &
  child=$!
  echo "$child" > "$state.pid"
  wait "$child"; code=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
  [ -f "$state.restart" ] || exit "$code"
  echo "tilt-run: restarting $*" >&2
done
WRAPPER
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["tilt-run", "sessiond"]
CMD ["api"]

# --- runtime: the default target ---------------------------------------------------------------
FROM runtime-base AS runtime
