"""``python -m dispatcher``: the command line, on uvloop when it is installed (faster I/O)."""

import asyncio

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    pass
else:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

from dispatcher.cli import main

raise SystemExit(main())
