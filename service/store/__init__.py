"""State stores: where session records live between steps.

One interface (`StateStore`), two backends: `MemoryStore` (embedded, one process)
and Redis: `RedisStore` (standalone or Sentinel, redis-py asyncio + hiredis) and
`RedisClusterStore` (Redis Cluster: keys grouped by node, one call per node). Both give the same semantics, which
the contract tests check on each: `load_many` and `commit_many` are one round trip
per batch, and `commit_many` is a compare-and-set per session on the bytes each
`Commit` names (`token_at`: for a session record, its `seq` + incarnation,
`rnnserve.service.record.CAS_TOKEN_OFFSET`). The stores know no record layout.
"""

from ._base import Commit, StateStore, check_session_id, key_prefix, session_key
from ._cluster import RedisClusterStore
from ._memory import MemoryStore
from ._redis import COMMIT_SCRIPT, RedisStore
from ._sentinel import AgreedSentinel, parse_sentinels

__all__ = [
    "COMMIT_SCRIPT",
    "AgreedSentinel",
    "Commit",
    "MemoryStore",
    "RedisClusterStore",
    "RedisStore",
    "StateStore",
    "check_session_id",
    "key_prefix",
    "parse_sentinels",
    "session_key",
]
