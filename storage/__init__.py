"""Storage: the only package that talks to PostgreSQL and Redis; api/ and actors/ go through it."""
