"""bench.procs reads what processes cost: a watched process's own CPU, its reaped children's, and a live
descendant's (a warm worker pool) — each counted once."""

from __future__ import annotations

import subprocess
import sys

from bench.procs import Watched, cpu_seconds, machine_cpu

#: CPU seconds the burning child spends (its own loop measures it with process_time)
BURN_S = 0.3

#: a parent with a child that burns BURN_S of CPU when the parent's first line of stdin arrives, says so,
#: and stays alive (unreaped) until the parent's second line
PARENT = f"""
import subprocess, sys
burner = subprocess.Popen([sys.executable, "-c", '''
import sys, time
sys.stdin.readline()
t = time.process_time()
while time.process_time() - t < {BURN_S}:
    pass
print("burnt", flush=True)
sys.stdin.readline()
'''], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print("started", flush=True)
for _ in range(2):
    burner.stdin.write(sys.stdin.readline())
    burner.stdin.flush()
    if _ == 0:
        print(burner.stdout.readline(), end="", flush=True)
burner.wait()
"""


def _say(parent: subprocess.Popen, line: str) -> None:
    parent.stdin.write(line + "\n")
    parent.stdin.flush()


def test_a_live_descendants_cpu_counts_once_as_the_childrens():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert parent.stdout.readline() == "started\n"
        watched = Watched("parent", parent.pid)
        watched.begin()  # the burner is alive, waiting
        _say(parent, "burn")
        assert parent.stdout.readline() == "burnt\n"
        cost = watched.end()  # the burner is still alive: its CPU is in no cutime yet
        assert BURN_S * 0.9 <= cost.children_cpu <= BURN_S + 0.2, cost
        assert cost.cpu - cost.children_cpu < BURN_S / 2, "the parent itself only waited"
        _say(parent, "go")
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_reaped_child_counts_in_its_parents_children_cpu():
    script = f"import subprocess, sys; subprocess.run([sys.executable, '-c', " \
             f"'import time\\nt = time.process_time()\\nwhile time.process_time() - t < {BURN_S}: pass'])\n" \
             "print('done', flush=True); sys.stdin.readline()"
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        watched = Watched("parent", parent.pid)
        watched.begin()
        assert parent.stdout.readline() == "done\n"
        cost = watched.end()
        assert BURN_S * 0.9 <= cost.children_cpu <= BURN_S + 0.2, cost
        assert cpu_seconds(parent.pid) >= cost.cpu
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.wait(timeout=30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_machines_busy_cpu_grows_by_at_least_what_a_process_burns():
    busy0, _ = machine_cpu()
    subprocess.run([sys.executable, "-c", f"import time\nt = time.process_time()\n"
                    f"while time.process_time() - t < {BURN_S}: pass"], check=True)
    busy1, _ = machine_cpu()
    assert busy1 - busy0 >= BURN_S * 0.9
