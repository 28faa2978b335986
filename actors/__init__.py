"""Dramatiq side of sessiond: the ingress that turns plain auth events into partitioned actor
messages, the partition actors that apply them, and the periodic jobs.

``actors.app`` is the module the Dramatiq CLI loads; it sets the broker before any actor module is
imported, as Dramatiq's best practices ask.
"""
