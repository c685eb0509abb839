"""A separate OS process that reserves credits concurrently; prints what it reserved as JSON.

Usage: python -m tests.integration.reserve_worker DSN ACCOUNT TASKS JOB_ID...
"""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg

from dispatcher.credits.ledger import CreditStore
from dispatcher.errors import InsufficientCredits


async def main(dsn: str, account: str, tasks: int, job_ids: list[str]) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=tasks, max_size=tasks)
    assert pool is not None
    store = CreditStore(pool)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for job_id in job_ids:
        queue.put_nowait(job_id)
    new: list[str] = []
    refused = 0

    async def worker() -> None:
        nonlocal refused
        while not queue.empty():
            job_id = queue.get_nowait()
            try:
                reservation = await store.reserve(job_id, account, 1)
            except InsufficientCredits:
                refused += 1
            else:
                if reservation.new:
                    new.append(job_id)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    await pool.close()
    print(json.dumps({"new": new, "refused": refused}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
