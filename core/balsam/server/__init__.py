"""The Balsam REST service: Starlette + SQLAlchemy (SQLite embedded, PostgreSQL shared)."""
