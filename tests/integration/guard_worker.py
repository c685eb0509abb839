"""A separate OS process that begins jobs concurrently (begin_job, the consumer's path); prints
its outcomes as JSON.

Usage: python -m tests.integration.guard_worker DSN ACCOUNT TASKS PRIORITY JOB_ID...
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import asyncpg

from dispatcher.jobs.store import JobStore, NewJob


async def main(dsn: str, account: str, tasks: int, priority: str, job_ids: list[str]) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=tasks, max_size=tasks)
    assert pool is not None
    store = JobStore(pool)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for job_id in job_ids:
        queue.put_nowait(job_id)
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while not queue.empty():
            job_id = queue.get_nowait()
            begun = await store.begin(NewJob(job_id, account, "sms", priority, {"id": job_id},
                                             1, "US", 1, 1))
            outcomes[begun.outcome] += 1

    await asyncio.gather(*(worker() for _ in range(tasks)))
    await pool.close()
    print(json.dumps(outcomes))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]))
