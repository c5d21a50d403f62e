"""CPU accounting and process handling of a measurement, with local processes
(no namespaces needed)."""

import shutil
import subprocess
import sys

import psutil
import pytest

from merbridge_py import sandbox
from merbridge_py.bench import procs

BURN = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"
        "print('burnt')\n")


def test_client_cpu_time_comes_from_its_own_rusage():
    run = procs.run_client(lambda **io: sandbox.spawn([sys.executable, "-c", BURN], **io), timeout_s=30)
    assert run.returncode == 0 and "burnt" in run.output
    assert 0.25 <= run.cpu_s < 5
    # user space is part of it (the loop also spends system time in process_time())
    assert 0.05 <= run.user_s <= run.cpu_s


def test_client_output_includes_stderr_and_exit_code():
    run = procs.run_client(lambda **io: sandbox.spawn(["sh", "-c", "echo out; echo err >&2; exit 3"], **io),
                           timeout_s=30)
    assert run.returncode == 3 and run.output.split() == ["out", "err"]


def test_a_client_past_its_deadline_is_ended():
    started = []

    def start(**io):
        started.append(sandbox.spawn(["sleep", "30"], **io))
        return started[0]

    with pytest.raises(TimeoutError):
        procs.run_client(start, timeout_s=0.3)
    assert started[0].poll() is not None        # ended and reaped, by its pid
    assert not psutil.pid_exists(started[0].pid) or psutil.Process(started[0].pid).status() == "zombie"


def test_cpu_snapshots_and_deltas():
    proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + BURN + "sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = procs.cpu_seconds([proc.pid, 999_999_999])
        assert list(before) == [proc.pid]           # a pid that does not exist is skipped
        assert proc.stdout.readline() == "burnt\n"
        after = procs.cpu_seconds([proc.pid])
        assert procs.cpu_delta(before, after) >= 0.25
    finally:
        proc.communicate("")
    assert procs.cpu_delta({1: 1.0, 2: 5.0}, {1: 1.5, 3: 9.0}) == pytest.approx(0.5)


def test_sidecars_are_told_from_apps_by_process_name(tmp_path):
    fake_haproxy = tmp_path / "haproxy"
    fake_haproxy.symlink_to(shutil.which("sleep"))
    sidecar = subprocess.Popen([str(fake_haproxy), "30"])
    app = subprocess.Popen(["sleep", "30"])
    try:
        roles = procs.classify([sidecar.pid, app.pid, 999_999_999])
        assert roles == {"sidecars": [sidecar.pid], "apps": [app.pid]}
    finally:
        for p in (sidecar, app):
            sandbox.stop(p)


def test_waiting_for_a_listener_gives_up_when_the_server_died():
    with pytest.raises(RuntimeError, match="exited"):
        procs.wait_listening(None, 1, timeout_s=2, alive=lambda: False)
