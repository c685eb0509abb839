"""Where the broadcast benchmark's PostgreSQL time goes: per-index and per-table buffer hits,
per-function time, scans — read from the scratch database's statistics views after the run.

Buffer hits per recipient that grow with the broadcast's size point at a statement whose cost
is O(recipients so far) per call.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from bench.broadcast_procs import Scratch

STATS_QUERIES = {
    "indexes": """
        SELECT s.relname AS table, s.indexrelname AS index,
               s.idx_blks_hit + coalesce(s.idx_blks_read, 0) AS blocks, u.idx_scan AS scans,
               u.idx_tup_read AS tuples_read
          FROM pg_statio_user_indexes s JOIN pg_stat_user_indexes u USING (indexrelid)
         ORDER BY blocks DESC LIMIT 15""",
    "tables": """
        SELECT s.relname AS table, s.heap_blks_hit + coalesce(s.heap_blks_read, 0) AS blocks,
               u.seq_scan, u.seq_tup_read, u.idx_scan, u.idx_tup_fetch, u.n_tup_ins,
               u.n_tup_upd, u.n_tup_hot_upd, u.n_dead_tup
          FROM pg_statio_user_tables s JOIN pg_stat_user_tables u USING (relid)
         ORDER BY blocks DESC LIMIT 12""",
    "functions": """
        SELECT funcname AS function, calls, round(total_time::numeric, 1) AS total_ms,
               round(self_time::numeric, 1) AS self_ms
          FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 15""",
}


async def track_functions(scratch: Scratch) -> None:
    """Count time per SQL function in every later session of the scratch database."""
    admin = await asyncpg.connect(scratch.admin_url)
    try:
        await admin.execute(f'ALTER DATABASE "{scratch.name}" SET track_functions = \'all\'')
    finally:
        await admin.close()


async def database_stats(pool: asyncpg.Pool, per: int) -> dict[str, list[dict[str, Any]]]:
    """The statistics views, with block counts also per ``per`` recipients."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name, sql in STATS_QUERIES.items():
        rows = [dict(r) for r in await pool.fetch(sql)]
        for row in rows:
            if "blocks" in row:
                row["blocks_per_recipient"] = round(row["blocks"] / per, 2)
        found[name] = rows
    return found


def format_stats(stats: dict[str, list[dict[str, Any]]]) -> str:
    """The statistics as plain text tables."""
    out: list[str] = []
    for name, rows in stats.items():
        out.append(f"-- {name}")
        if rows:
            out.append("  ".join(rows[0]))
        out.extend("  ".join(str(v) for v in row.values()) for row in rows)
    return "\n".join(out)
