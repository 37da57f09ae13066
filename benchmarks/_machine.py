"""Machine measurement shared by the benchmarks: CPU accounting from /proc, waiting for a quiet
machine, the git revision a result was made from, a timestamped log line, and writing a
result's JSON and markdown.

``CpuMeter`` splits the CPU seconds spent during a block between this process ("driver"), its
descendants ("children": Ray's processes, a multiprocessing pool) and everything else on the
machine ("foreign"). Its defaults are train_throughput.py's accounting: the process table is
re-read in a thread so that processes of ours that exit meanwhile still count, children's
reaped CPU counts, and "foreign" is the machine's busy time from /proc/stat minus ours.
preprocess_images.py passes ``every=None, machine_wide=False, reaped=False``: the table at the
two ends only and "foreign" = the CPU of the other processes /proc shows.

``cpu_snapshot`` also runs inside Ray Train workers (train_throughput.py ships this module's
functions there by value), so this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# /proc: the process table and tree, the machine's busy time
# --------------------------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, float, float, str]]:
    """{pid: (ppid, own CPU s, CPU s of its reaped children, name)} of every process."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        v = raw[raw.rfind(")") + 2:].split()
        table[int(entry)] = (int(v[1]), (int(v[11]) + int(v[12])) / TCK,
                             (int(v[13]) + int(v[14])) / TCK, raw[raw.find("(") + 1:raw.rfind(")")])
    return table


def process_tree(table: dict, root: int) -> set[int]:
    """``root`` and its descendants in ``table`` (rows of ``proc_table``)."""
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(row[0], []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all but idle and iowait), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(v) - v[3] - v[4]) / TCK


# --------------------------------------------------------------------------------------------
# CPU accounting of a block: this process tree vs the rest of the machine
# --------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds spent during a block by this process ("driver") and its descendants
    ("children": Ray's processes, a pool's), and by everything else on the machine ("foreign").

    ``machine_wide``: "foreign" = the machine's busy time from /proc/stat minus ours (processes
    this /proc does not show, or that come and go, count too); ``cpu`` then also has "machine"
    and "visible_foreign" (the other processes /proc shows). Without it, or without /proc/stat,
    "foreign" is the visible other processes' CPU (and without it ``cpu`` has no other keys).
    ``every``: the process table is re-read every ``every`` seconds in a thread, so a process of
    ours that exits meanwhile (a Ray Train worker: raylet does not collect its children's times)
    counts with the CPU it had at its last sighting; ``None``: read at the two ends only.
    ``reaped``: a process's CPU includes that of the children it has reaped.

    After the block: ``wall`` (s), ``cpu`` ({kind: CPU s}), ``foreign_load`` (foreign CPU s /
    wall: other work's cores; near a whole core means the block shared the machine) and
    ``children`` (the busiest 8 of our processes by name, CPU s)."""

    def __init__(self, every: float | None = 1.0, *, machine_wide: bool = True,
                 reaped: bool = True):
        self.every, self.machine_wide, self.reaped = every, machine_wide, reaped

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            table = proc_table()
            with self._lock:
                self.seen.update(table)

    def __enter__(self) -> CpuMeter:
        self.t0, self.before = time.perf_counter(), proc_table()
        self.busy0 = machine_busy_s() if self.machine_wide else None
        # Each process's last sighting: from the start on when sampling (a row that a racing
        # read misses still links its children to our tree); the end table alone otherwise.
        self.seen: dict = dict(self.before) if self.every is not None else {}
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = None
        if self.every is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        after = proc_table()
        busy1 = machine_busy_s() if self.machine_wide else None
        self.wall = time.perf_counter() - self.t0
        last = {**self.seen, **after}
        me = os.getpid()
        mine = process_tree(last, me) | process_tree(self.before, me)
        d = {"driver": 0.0, "children": 0.0, "visible_foreign": 0.0}
        by_child: dict[str, float] = {}
        for pid, (_, cpu, reaped, name) in last.items():
            _, cpu0, reaped0, _ = self.before.get(pid, (0, 0.0, 0.0, ""))
            k = "driver" if pid == me else "children" if pid in mine else "visible_foreign"
            used = max(cpu - cpu0, 0.0)
            if self.reaped:
                used += max(reaped - reaped0, 0.0)
            d[k] += used
            if k == "children" and used > 0:
                by_child[name] = by_child.get(name, 0.0) + used
        self.children = {k: round(v, 2) for k, v in sorted(by_child.items(),
                                                           key=lambda kv: -kv[1])[:8]}
        if not self.machine_wide:
            d["foreign"] = d.pop("visible_foreign")
        elif busy1 is not None and self.busy0 is not None:
            d["machine"] = busy1 - self.busy0
            d["foreign"] = max(d["machine"] - d["driver"] - d["children"], 0.0)
        else:
            d["foreign"] = d["visible_foreign"]
        self.cpu = {k: round(v, 3) for k, v in d.items()}
        self.foreign_load = d["foreign"] / self.wall if self.wall else 0.0


def wait_quiet(threshold: float, max_wait: float, window: float = 1.0, **meter) -> dict:
    """Wait until other processes use < ``threshold`` cores (measured over ``window`` s by a
    ``CpuMeter(**meter)``), or until ``max_wait`` s have passed."""
    t0 = time.perf_counter()
    while True:
        with CpuMeter(**meter) as m:
            time.sleep(window)
        waited = time.perf_counter() - t0
        if m.foreign_load < threshold or waited >= max_wait:
            if waited > 2 * window:
                print(f"  (waited {waited:.0f} s for other jobs to finish; foreign load now "
                      f"{m.foreign_load:.2f} cores)")
            return {"waited_s": round(waited, 1), "foreign_load": round(m.foreign_load, 3),
                    "quiet": m.foreign_load < threshold}


def settle(max_wait: float = 60.0, window: float = 0.5, idle: float = 0.05, **meter) -> float:
    """Wait until this process's children (Ray's processes: workers import for a while after
    start-up, and wind down after a run) use < ``idle`` CPU s per ``window`` s, or until
    ``max_wait`` s have passed. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with CpuMeter(**meter) as m:
            time.sleep(window)
        if m.cpu["children"] < idle:
            break
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Inside one process: CPU by thread, and the machine's, between two moments
# --------------------------------------------------------------------------------------------


def cpu_snapshot() -> dict:
    """CPU seconds of each thread of this process (by name) and of the whole machine."""
    threads = {}
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        threads[tid] = [raw[raw.find("(") + 1: raw.rfind(")")],
                        (int(fields[11]) + int(fields[12])) / TCK]
    return {"t": time.perf_counter(), "threads": threads, "machine_busy_s": machine_busy_s()}


def cpu_during(a: dict, b: dict) -> dict:
    """Cores used between two snapshots: by thread name in this process, and machine-wide."""
    span = b["t"] - a["t"]
    by_name: dict[str, float] = {}
    for tid, (name, cpu) in b["threads"].items():
        by_name[name] = by_name.get(name, 0.0) + cpu - a["threads"].get(tid, [name, 0.0])[1]
    out = {"process_cores": sum(by_name.values()) / span,
           "threads_cores": {k: round(v / span, 3) for k, v in
                             sorted(by_name.items(), key=lambda kv: -kv[1]) if v > 0},
           "busiest_threads": sorted(
               ((round((cpu - a["threads"].get(tid, [name, 0.0])[1]) / span, 3), name)
                for tid, (name, cpu) in b["threads"].items()), reverse=True)[:6]}
    if a["machine_busy_s"] is not None:
        out["machine_cores"] = (b["machine_busy_s"] - a["machine_busy_s"]) / span
    return out


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def git_revision() -> str:
    """Short HEAD of this repository, with " (tasks/ modified)" when tasks/ has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "tasks"], cwd=REPO, text=True,
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (tasks/ modified)" if dirty else "")


def log(msg: str) -> None:
    """``[HH:MM:SS] msg``, flushed (the benchmarks run for many minutes under tee)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_result(out: str | Path, tag: str, result: dict, text: str) -> None:
    """``out/<tag>.json`` (the result) and ``out/<tag>.md`` (``text``, its table), then print
    the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"{tag}.md").write_text(text)
    print(text)
