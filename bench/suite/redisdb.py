"""The Redis database the Redis-based peers use: db 5, flushed before and after.

Never db 0: the benchmark only ever empties the database it owns.
"""

from __future__ import annotations

URL = "redis://127.0.0.1:6379/5"


def flush() -> None:
    import redis

    redis.Redis.from_url(URL).flushdb()


def persistence() -> str:
    """What Redis promises on disk right now (AOF / RDB snapshots), for the table."""
    import redis

    r = redis.Redis.from_url(URL)
    aof = r.config_get("appendonly").get("appendonly")
    fsync = r.config_get("appendfsync").get("appendfsync")
    save = r.config_get("save").get("save")
    if aof == "yes":
        return f"Redis AOF, appendfsync {fsync}"
    return f"Redis RDB snapshots '{save}'" if save else "Redis without persistence"
