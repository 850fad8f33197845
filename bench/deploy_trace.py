#!/usr/bin/env python3
"""bench/deploy_trace.py: where the wall time of a sequential run of commands goes.

Reads `perf script` output of the scheduler tracepoints sched_process_fork, _exec and
_exit recorded system-wide while one program ran its commands one after the other
(bench/deploy_trace.sh records them for opsrun deploy --jobs 1, the bare opsrun script and
the sh baseline of bench/deploy_bench.sh) and splits the run into:
  start      from the program's exec to its first child's fork
  spawn      each child's fork to its exec (the spawner's child side and execve itself)
  child      each child's exec to its exit (the command's own work)
  gap        a child's exit to the next child's fork (the program's work in between),
             split into gaps inside a step (same tool as the child before) and at a
             step's change (another tool: the engine's work per step)
  end        from the last child's exit to the program's exit
Usage: deploy_trace.py PERF_SCRIPT_OUTPUT NAME
"""
import re
import sys


def main(path, name):
    events = []
    with open(path) as f:
        for line in f:
            m = re.search(r"(\S+)\s+(\d+)\s+\[\d+\]\s+([\d.]+): sched:(\w+): (.*)", line)
            if m:
                events.append((float(m.group(3)), m.group(4), int(m.group(2)), m.group(5)))
    if not events:
        sys.exit(f"{path}: no sched_process_* events (was perf record run as root?)")
    # the traced program: the first exec perf itself did not do
    first = next((e for e in events if e[1] == "sched_process_exec" and "perf" not in e[3]), None)
    if first is None:
        sys.exit(f"{path}: no exec of the traced program")
    main_pid, t0 = first[2], first[0]
    forks, execs, exits = {}, {}, {}
    for t, kind, pid, rest in events:
        if kind == "sched_process_fork" and pid == main_pid:
            forks[int(re.search(r"child_pid=(\d+)", rest).group(1))] = t
        elif kind == "sched_process_exec":
            execs[pid] = (t, re.search(r"filename=(\S+)", rest).group(1).rsplit("/", 1)[-1])
        elif kind == "sched_process_exit":
            exits[pid] = t
    kids = sorted((c for c in forks if c in execs and c in exits), key=lambda c: forks[c])
    if not kids:
        sys.exit(f"{path}: the program started no child")
    end = exits.get(main_pid, max(e[0] for e in events))

    def ms(xs):
        return sum(xs) * 1000

    def median_us(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] * 1e6 if xs else 0

    spawn = [execs[c][0] - forks[c] for c in kids]
    child = [exits[c] - execs[c][0] for c in kids]
    inside, change = [], []
    for a, b in zip(kids, kids[1:]):
        (inside if execs[a][1] == execs[b][1] else change).append(forks[b] - exits[a])
    print(f"{name}: {(end - t0) * 1000:.1f} ms, {len(kids)} children")
    print(f"  start {(forks[kids[0]] - t0) * 1000:6.1f} ms   end {(end - exits[kids[-1]]) * 1000:6.1f} ms")
    print(f"  spawn {ms(spawn):6.1f} ms (median {median_us(spawn):4.0f} us)   "
          f"child {ms(child):6.1f} ms (median {median_us(child):4.0f} us)")
    print(f"  gaps inside a step {ms(inside):6.1f} ms (n={len(inside)}, median {median_us(inside):4.0f} us)   "
          f"at a step's change {ms(change):6.1f} ms (n={len(change)}, median {median_us(change):4.0f} us)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
