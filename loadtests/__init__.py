"""Load tests and benchmarks of sessiond on the local stack (docs/loadtests.md).

``loadtests/locustfiles/`` holds the Locust scenarios (gevent; no application code), the other
modules drive them and the benchmark from the outside (``python -m loadtests.run``,
``python -m loadtests.bench``).
"""
