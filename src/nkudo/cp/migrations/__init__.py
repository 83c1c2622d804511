"""Alembic migrations shipped in the package (run programmatically by ``nkudo.cp.db``)."""
