"""Elastic queue for balsam: the ``elastic_queue`` agent module and its scaling strategies.

See docs/elastic.md. Entry points: ``balsam.agent_modules: elastic_queue`` and
``balsam.elastic_strategies: backfill, simple``.
"""

from .backfill import BackfillStrategy
from .options import ElasticQueueOptions
from .simple import SimpleOptions, SimpleStrategy
from .strategy import Backlog, BatchJobView, Decision, Snapshot, Strategy, StrategyError, Submission, load_strategy

__all__ = [
    "BackfillStrategy",
    "Backlog",
    "BatchJobView",
    "Decision",
    "ElasticQueueOptions",
    "SimpleOptions",
    "SimpleStrategy",
    "Snapshot",
    "Strategy",
    "StrategyError",
    "Submission",
    "load_strategy",
]
