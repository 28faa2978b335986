"""sessiond: tells other services, fast and correctly, whether a user's session is alive."""

__version__ = "0.1.0"
