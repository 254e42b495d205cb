"""Issue 13.4, the long run: the fuzzers of tests/e2e/test_fuzz_e2e.py (tests/fuzzing.py)
against the real milter, policyd, tracker and API processes for as long as asked, then a
table per target: cases sent, crashes (processes that died plus unhandled exceptions in
their logs; must be 0), the largest RSS seen next to its bound, connections (or
messages) stopped by a cap or a timeout (from the services' log lines), and the valid-
client checks run after every batch.

    .venv/bin/python bench/fuzz                         # 60 s per target, seed 1
    .venv/bin/python bench/fuzz --seconds 120 --seed 7 --targets milter,policyd
    .venv/bin/python bench/fuzz --iterations 2000       # a fixed number of cases per target

Batches of `--batch` cases each get their own seed (seed, seed+1, ...), so a failing batch
can be replayed: `--seed N --iterations BATCH`. Exit status 0: no crash, every check
passed, every RSS under its bound; 1 otherwise (problems listed, work directory kept).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import FuzzStack, Report, Runner, targets  # noqa: E402

from relaylab.devstack.workdir import make_workdir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("--iterations", type=int, default=0,
                    help="cases per target instead of --seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=100, help="cases between checks (default 100)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--targets", default="milter,policyd,tracker,api")
    args = ap.parse_args()

    workdir = make_workdir("relaylab-bench-fuzz-")
    stack = FuzzStack(workdir)
    try:
        stack.start()
    except Exception as e:
        print(f"the stack did not start: {e}")
        return 2
    report = Report()
    runner = Runner(stack, report)
    ok = False
    try:
        rest = {s: round(stack.rss_mib(s)) for s in stack.procs}
        print(f"RSS at rest (MiB): {rest}")
        all_targets = targets(stack)
        for name in args.targets.split(","):
            target = all_targets[name]
            seed = args.seed
            started = time.monotonic()
            while True:
                done = report.cases[name]
                if args.iterations and done >= args.iterations:
                    break
                if not args.iterations and time.monotonic() - started >= args.seconds:
                    break
                n = min(args.batch, args.iterations - done) if args.iterations else args.batch
                runner.batch(target, random.Random(seed), n, concurrency=args.concurrency)
                seed += 1
                if report.deaths[name]:
                    break
            took = time.monotonic() - started
            print(f"{name}: {report.cases[name]} cases in {took:.0f} s, seeds {args.seed}..{seed - 1}, "
                  f"kinds {dict(sorted(report.kinds.get(name, {}).items()))}", flush=True)
        print()
        print(report.table())
        problems = report.problems()
        ok = not problems
        if problems:
            print("\nPROBLEMS:\n" + "\n".join(problems))
            print(f"logs kept in {workdir}")
    finally:
        stack.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
