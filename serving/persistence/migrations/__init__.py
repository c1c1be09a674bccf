"""Alembic migrations of the results database (``env.py``, ``versions/``): the only code that
creates or changes its tables. Run through ``serving.persistence.migrate``."""
