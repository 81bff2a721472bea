"""Task history in PostgreSQL (``flumeq[postgres]``).

- ``Engine(history=DSN)`` records each task's lifecycle: events go into the
  queue's events stream in Redis with the outcomes, and the engine's history
  process writes them into PostgreSQL in batches (``sink``);
- ``History(dsn).search(...)`` and ``.task(id)`` read them (``search``);
- the schema is created and migrated by flumeq (``schema``).

See docs/history.md.
"""

from __future__ import annotations

from .dsn import HistoryUnavailable, masked
from .search import History

__all__ = ["History", "HistoryUnavailable", "masked"]
