"""Compaction: keep consumed records and replay a recent window for a few mini-batch epochs.

Pure: no Kafka here. The worker appends each decoded poll batch to a
:class:`CompactionStore`, counts trained records in a
:class:`CompactionTrigger`, and when the trigger names a reason it takes a
window from the store and runs :func:`train_epochs` on it.
"""

from streamtrainer.training.compaction.epochs import EpochReport, evaluate, split_holdout, train_epochs
from streamtrainer.training.compaction.store import CompactionStore, EpochData, ShardInfo
from streamtrainer.training.compaction.trigger import CompactionRequester, CompactionTrigger

__all__ = [
    "CompactionRequester",
    "CompactionStore",
    "CompactionTrigger",
    "EpochData",
    "EpochReport",
    "ShardInfo",
    "evaluate",
    "split_holdout",
    "train_epochs",
]
