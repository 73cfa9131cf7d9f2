"""Several writer processes at once, and a writer killed with SIGKILL mid-batch."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from fedpact.audit import EventType, Ledger


def _writer(db_path: str, worker: int, count: int, start) -> None:
    """Child body: append `count` events one by one and `count` more in batches of 10."""
    with Ledger.open(db_path, checkpoint_every=25) as ledger:
        start.wait(timeout=60)
        for i in range(count):
            ledger.append(EventType.JOB_FAILED, {"reason": "test", "worker": worker, "i": i}, actor=f"p{worker}")
        for b in range(count // 10):
            ledger.append_many(
                (EventType.JOB_FAILED, {"reason": "test", "worker": worker, "i": count + b * 10 + j}, f"p{worker}", None)
                for j in range(10)
            )


def test_four_processes_append_one_consistent_chain(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    Ledger.open(db).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    count = 60
    workers = [context.Process(target=_writer, args=(str(db), w, count, start)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]

    with Ledger.open(db) as ledger:
        events = ledger.events()
        result = ledger.verify()
        checkpoints = ledger.checkpoints()
    written = [(e.payload["worker"], e.payload["i"]) for e in events]
    expected = {(w, i) for w in range(4) for i in range(2 * count)}
    assert len(written) == len(expected) == 4 * 2 * count  # nothing lost, nothing duplicated
    assert set(written) == expected
    assert [e.seq for e in events] == list(range(1, len(expected) + 1))
    actors_in_order = [e.actor for e in events]
    assert len({tuple(actors_in_order[i:i + 2]) for i in range(len(events) - 1)}) > 4  # interleaved
    assert result.ok and result.events_checked == len(expected)
    assert result.signed_tree_size == len(expected) and len(checkpoints) >= 4


def test_threads_share_group_commits(tmp_path: Path) -> None:
    """8 threads appending one event at a time commit in fewer transactions than events."""
    with Ledger.open(tmp_path / "l.db") as ledger:
        commits = {"n": 0}
        real = ledger._write_once

        def counting(batch):
            commits["n"] += 1
            return real(batch)

        ledger._write_once = counting  # type: ignore[method-assign]
        barrier = threading.Barrier(8)

        def run(worker: int) -> None:
            barrier.wait()
            for i in range(40):
                ledger.append(EventType.JOB_FAILED, {"reason": "test", "w": worker, "i": i}, actor="t")

        threads = [threading.Thread(target=run, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert ledger.count() == 320
        assert commits["n"] < 320
        assert ledger.verify().ok


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from fedpact.audit import EventType, Ledger
    db, log = sys.argv[1], sys.argv[2]
    ledger = Ledger.open(db, checkpoint_every=300)
    with open(log, "a") as out:
        batch = 0
        while True:
            events = ledger.append_many(
                (EventType.JOB_FAILED, {"reason": "test", "batch": batch, "i": i}, "writer", None) for i in range(200)
            )
            out.write(f"{events[0].event_id} {events[-1].event_id} {events[-1].seq}\\n")
            out.flush()
            batch += 1
    """
)


def test_kill_9_mid_batch_loses_nothing_committed(tmp_path: Path) -> None:
    db, log = tmp_path / "ledger.db", tmp_path / "committed.txt"
    log.touch()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(db), str(log)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(log.read_text().splitlines()) < 8:
        time.sleep(0.01)
    time.sleep(0.013)  # land somewhere inside the next batch
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    committed = [line.split() for line in log.read_text().splitlines()]
    assert len(committed) >= 8
    with Ledger.open(db) as ledger:
        count = ledger.count()
        result = ledger.verify()
        for first_id, last_id, last_seq in committed:
            assert ledger.event(first_id).seq == int(last_seq) - 199
            assert ledger.event(last_id).seq == int(last_seq)
        assert count % 200 == 0  # a batch is all or nothing
        assert count >= 200 * len(committed)
        ledger.append(EventType.JOB_FAILED, {"reason": "test", "after": "crash"}, actor="recovery")
    assert result.ok and result.events_checked == count
    with Ledger.open(db) as ledger:
        after = ledger.verify()
    assert after.ok and after.signed_tree_size == count + 1
