"""Ray actors that hold a drafter/target pair and decode shards of a job (imports cmsd, never jobs).

Importing this package loads neither torch nor ray: the actor imports them in its constructor.
"""

from workers.actor import ShardWorker
from workers.protocol import ShardOutcome, ShardTask, WorkerConfig, WorkerInfo
from workers.store import JobStore

__all__ = ["JobStore", "ShardOutcome", "ShardTask", "ShardWorker", "WorkerConfig", "WorkerInfo"]
