"""The python tool's sandbox (minigrpo/agent/sandbox.py) against code that tries to do harm: each attempt is
contained within its limits, the caller gets a result, and the test process goes on."""

import os
import socket
import struct
import subprocess
import time

import pytest

from minigrpo.agent import sandbox
from minigrpo.agent.sandbox import Limits, run_python
from minigrpo.agent.tools import python

# CI installs bubblewrap (scripts/setup.sh): there a missing sandbox is a failure, on a laptop without it a skip
if sandbox.check() and not os.environ.get("CI"):
    pytest.skip(f"no sandbox here: {sandbox.check()}", allow_module_level=True)

LIMITS = Limits(wall_s=5.0, cpu_s=2, memory_mb=256, output_bytes=4096, disk_mb=4)


def run(code: str) -> sandbox.Result:
    t0 = time.perf_counter()
    result = run_python(code, LIMITS)
    assert time.perf_counter() - t0 < LIMITS.wall_s + 2  # every case is bounded in time
    return result


def test_plain_code_runs_and_prints():
    result = run("print(sum(range(10)), 2**100)")
    assert result.ok and result.stdout == f"45 {2**100}\n"


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run("while True:\n    pass")
    assert result.returncode != 0 and result.seconds < LIMITS.wall_s  # SIGXCPU at cpu_s, before the wall limit


def test_a_sleeping_program_is_stopped_by_the_wall_limit():
    result = run("import time\ntime.sleep(60)")
    assert result.stopped == "timeout" and result.returncode == -9


def test_a_fork_bomb_cannot_fork():
    result = run("import os\nwhile True:\n    os.fork()")
    assert result.returncode == 1 and "PermissionError" in result.stderr


def test_os_system_and_subprocess_start_nothing():
    result = run("import os\nprint(os.system('touch /tmp/escaped'))\nprint(os.path.exists('/tmp/escaped'))")
    assert result.stdout.split() == ["32512", "False"]  # the shell never started (exit status 127 << 8)
    result = run("import subprocess\nsubprocess.run(['true'])")
    assert "PermissionError" in result.stderr


def test_threads_still_work():
    result = run("import threading\nout = []\nt = threading.Thread(target=out.append, args=[7])\nt.start()\n"
                 "t.join()\nprint(out)")
    assert result.stdout == "[7]\n"


def test_a_memory_bomb_hits_the_memory_limit():
    result = run("x = bytearray(1024**3)")
    assert "MemoryError" in result.stderr
    result = run("x = []\nwhile True:\n    x.append(' ' * 10**6)")
    assert "MemoryError" in result.stderr


def test_nothing_outside_the_work_folder_is_writable(tmp_path):
    target = tmp_path / "outside.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')")
    assert result.returncode == 1 and not target.exists()
    for path in ("/usr/escaped", "/escaped", "/dev/escaped", "/sandbox/escaped", "/proc/escaped"):
        result = run(f"open({path!r}, 'w')")
        assert result.returncode == 1 and "Error" in result.stderr, path
    result = run("open('notes.txt', 'w').write('kept for the run')\nprint(open('notes.txt').read())")
    assert result.stdout == "kept for the run\n"  # the temporary /tmp folder is writable
    result = run("open('big', 'wb').write(b'x' * (64 * 2**20))")
    assert "File too large" in result.stderr


def test_the_writable_folders_are_capped_in_total():
    """Many files under the per-file limit still stop at the folder's size (a tmpfs in memory: not a way to fill
    the machine's RAM)."""
    code = ("written = 0\nfor i in range(16):\n    try:\n        open(f'{folder}/f{i}', 'wb').write(b'x' * 2**20 * 3)"
            "\n        written += 3\n    except OSError:\n        break\nprint(written)")
    for folder in ("/tmp", "/dev/shm"):
        result = run(code.replace("{folder}", folder))
        assert int(result.stdout) <= LIMITS.disk_mb, folder


def test_no_namespaces_no_other_abi():
    result = run("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "print(libc.unshare(0x10000000), ctypes.get_errno(), libc.unshare(0x00020000), ctypes.get_errno())")
    assert result.stdout.split() == ["-1", "1", "-1", "1"]  # new user / mount namespace: EPERM
    result = run("import ctypes\nctypes.CDLL(None).syscall(0x40000000 + 57)\nprint('forked')")  # x32's fork
    assert result.returncode == 128 + 31 and not result.stdout  # SIGSYS (bwrap reports 128 + signal): killed


def test_the_users_files_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    result = run(f"print(open({str(secret)!r}).read())")
    assert "password" not in result.stdout and "FileNotFoundError" in result.stderr
    result = run("print(open('/etc/passwd').read())")
    assert "FileNotFoundError" in result.stderr
    result = run(f"import os\nprint(os.path.exists({os.getcwd()!r}), os.path.exists(os.path.expanduser('~root')))")
    assert result.stdout == "False False\n"


def test_no_network():
    result = run("import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=2)")
    assert "Network is unreachable" in result.stderr
    server = socket.socket(socket.AF_UNIX)  # an abstract socket of this process: reachable by name on this host
    name = f"minigrpo-test-{os.getpid()}"
    server.bind("\0" + name)
    server.listen(1)
    try:
        result = run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0{name}')\nprint('in')")
        assert "ConnectionRefusedError" in result.stderr and "in" not in result.stdout  # another network namespace
    finally:
        server.close()


def test_the_parent_and_other_processes_cannot_be_killed():
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        result = run("import os, signal\nprint(os.getppid())\nos.kill(os.getppid(), signal.SIGKILL)\n"
                     f"os.kill({os.getpid()}, signal.SIGKILL)")
        assert result.stdout.startswith("1\n") and "ProcessLookupError" in result.stderr  # its own PID namespace
        run(f"import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill({bystander.pid}, signal.SIGKILL)")
        assert bystander.poll() is None  # kill(-1) and the bystander's pid reach nothing outside the sandbox
    finally:
        bystander.kill()
        bystander.wait()


def test_huge_output_is_capped_and_stopped():
    result = run("while True:\n    print('x' * 1000)")
    assert result.stopped == "output" and len(result.stdout) <= LIMITS.output_bytes


def test_the_python_tool_answers_with_output_or_the_error():
    assert python("print(6 * 7)") == "42"
    assert python("1 / 0").endswith("ZeroDivisionError: division by zero")


def test_the_filter_is_the_program_described():
    """Every jump lands inside the program on a return or the clone block; the first checks are the ABI's."""
    for machine in ("x86_64", "aarch64"):
        prog = sandbox.seccomp_filter(machine)
        ops = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
        assert ops[0] == (0x20, 0, 0, 4) and ops[1][0] == 0x15 and ops[-1] == (0x06, 0, 0, 0x80000000)
        for pc, (code, jt, jf, _) in enumerate(ops):
            if code & 0x07 == 0x05:  # a jump
                assert pc + 1 + jt < len(ops) and pc + 1 + jf < len(ops)
        returns = {k for code, _, _, k in ops if code == 0x06}
        assert returns == {0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38}
