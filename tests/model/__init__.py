"""A model checker of the running system (issue 11): seeded histories played against the real
API, workers and scheduler while a nemesis injects faults, every answer checked against a tiny
reference model. ``python -m tests.model --minutes N --seed S``; see docs/reliability.md."""
