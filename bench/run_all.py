"""Run every benchmark one after another and record its figures in ``bench/RESULTS.md``.

``python -m bench.run_all [--only ledger,pipeline,issue15,priority,preflight,broadcast,scale,
guards,fairness] [--dry-run]`` (``make bench``). Each benchmark runs in its own process, in
sequence, so no two of them share the machine; run it on a quiet machine, since other work on
the cores moves every rate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS: dict[str, list[str]] = {
    "ledger": ["bench.ledger_reserve", "--runs", "5", "--seconds", "10", "--what-if",
               "--record"],
    "pipeline": ["bench.pipeline", "--runs", "3", "--record"],
    "issue15": ["bench.pipeline_peer", "--rounds", "3", "--jobs", "5000", "--accounts", "1000",
                "--record"],
    "priority": ["bench.pipeline", "--priority-only", "--backlog", "100000", "--probes", "100",
                 "--record"],
    "preflight": ["bench.preflight", "--runs", "7", "--write"],
    "broadcast": ["bench.broadcast", "--recipients", "100000", "--ceiling", "100000", "--write"],
    # 1, 2 and 3 replicas against a 3-node broker and a primary + standby (private nodes).
    "scale": ["bench.scale", "--jobs", "3000", "--record"],
    "guards": ["bench.guards", "--runs", "15", "--seconds", "1", "--record"],
    "fairness": ["bench.fairness", "--jobs", "100000", "--small", "10", "--runs", "1",
                 "--window", "10", "--baseline", "--record"],
}


def commands(only: list[str]) -> list[list[str]]:
    """The command lines to run, in the order of ``BENCHMARKS``; unknown names are an error."""
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)}; "
                         f"choose from {', '.join(BENCHMARKS)}")
    chosen = [name for name in BENCHMARKS if not only or name in only]
    return [[sys.executable, "-m", *BENCHMARKS[name]] for name in chosen]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--only", default="", help="comma-separated names; default all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    only = [name for name in args.only.split(",") if name]
    for command in commands(only):
        print("$ python", " ".join(command[1:]), flush=True)
        if args.dry_run:
            continue
        started = time.monotonic()
        subprocess.run(command, check=True)
        print(f"  done in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
