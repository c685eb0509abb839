"""``python -m dispatcher``: the same command line as the ``dispatcher`` script (on uvloop)."""

from dispatcher.cli import main

raise SystemExit(main())
