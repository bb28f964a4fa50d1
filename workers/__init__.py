"""Data, niches and the online learners, hosted in-process or on Ray actors."""

from forkpop.workers.data import DataBundle, DataError, DataSpec, load_data
from forkpop.workers.learner import ForkTask, GroupLearner, LearnerSpec, LearnResult, ModelSpec
from forkpop.workers.niches import partition, stream_batches
from forkpop.workers.pool import BACKENDS, LocalPool, Pool, make_pool

__all__ = [
    "BACKENDS",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ForkTask",
    "GroupLearner",
    "LearnerSpec",
    "LearnResult",
    "LocalPool",
    "ModelSpec",
    "Pool",
    "load_data",
    "make_pool",
    "partition",
    "stream_batches",
]
