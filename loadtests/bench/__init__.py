"""The benchmark: each figure of issue 5 beside its limit, measured in one run on this machine.

    .venv/bin/python -m loadtests.bench [--quick] [--profile] [--only 1,2,3,4,5]

1. ``/auth/check`` on a cache hit (requests/s, p50, p99) against a bare Sanic route returning
   200, same number of workers, same load tool (``wrk -t1 -c64 -d10s --latency``); target ratio
   >= 0.7. Then the revocation delay: publish ``disconnected`` → first 403 (median <= 100 ms).
2. Events applied per second end to end (publish → committed in PostgreSQL) against raw pika
   publish + consume + ack of the same messages on the same broker; target ratio >= 0.5.
3. PostgreSQL row updates caused by 100,000 granted requests from 1,000 users (one session
   each) across 2 flushes (pg_stat_user_tables deltas; target <= 4,000: one per user and one per
   session per flush).
4. Expiry sweep seconds for 1,000,000 connected / 100,000 stale users (``bench_expiry.py``).
5. Redis memory per 100,000 cached users; RSS of one API worker and one worker process.

Everything runs on 127.0.0.1 in a namespace of its own (vhost and database ``sessiond_bench5``,
Redis db 12), API and workers started as ``sessiond api`` / ``sessiond worker`` would. Prints a
readable table on stderr and one JSON document on stdout (also written to
``results/bench.json``). ``--profile`` samples the API (stage 1) and the workers (stage 2) with
py-spy and adds their hottest frames; profiling perturbs the figures, so run it separately.
"""
