"""The sandbox that runs model-written Python (the `python` tool, and code rewards): bubblewrap + seccomp + limits.

What contains the code, and why that is enough (no string filtering anywhere):
- **bubblewrap** (`bwrap`, Debian's `bubblewrap`; the tool Flatpak runs apps in) starts it in new namespaces
  (`--unshare-all`): its own network namespace with no interface but a down loopback (no network, no host
  sockets, abstract ones included), its own PID namespace (it sees and can signal only its own processes: the
  trainer is out of reach; when the sandbox's first process dies, every process in it dies), its own mount
  namespace holding only what is listed here: the Python installation and the system libraries read-only, a
  fresh /proc and minimal /dev, and one writable folder, a size-capped tmpfs at /tmp (`--size`), gone when the
  run ends. The user's files, /etc, /root, /home and the trainer's folders are not there to read or write.
  Capabilities are dropped (`--cap-drop ALL`), it runs as uid 65534 in a user namespace, in a new session (no
  terminal injection), and dies with its parent (`--die-with-parent`).
- **seccomp** (a 14-instruction BPF filter handed to bwrap's `--seccomp`): no new process at all (fork, vfork,
  and clone without CLONE_THREAD fail with EPERM; clone3 with ENOSYS, so the C library falls back to clone, which
  the filter can read): a fork bomb, `os.system` and `subprocess` fail at once. Threads are allowed; the memory
  limit bounds them. (RLIMIT_NPROC cannot do this here: it does not bind processes run by root, as CI's are.)
- **resource limits** (setrlimit, inherited by bwrap and the code): CPU seconds, address space (memory), size
  of any file written, open files; plus a **wall-clock** limit and an **output** cap enforced from outside: past
  either, the sandbox is killed (its PID namespace with it).
Code runs with the interpreter minigrpo runs on, in isolated mode (`-I`: no environment variables, no user
site, no current folder on the path) and without site-packages (`-S`): the standard library only.

`run_python(code)` never raises for what the code does: a crash, a timeout or an escape attempt is a result.
Linux x86-64 and aarch64 (the filter names their syscall numbers); `check()` says what is missing elsewhere.
"""

from __future__ import annotations

import functools
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Per architecture: its audit value, clone, clone3, and the calls refused outright with EPERM: new processes
# (fork, vfork), and what a process needs to leave its namespaces or attack the kernel (unshare, setns, mount,
# umount2, pivot_root, ptrace, bpf, keyctl, add_key, request_key, userfaultfd, io_uring_setup, perf_event_open).
_ARCH = {
    "x86_64": (0xC000003E, 56, 435, (57, 58, 272, 308, 165, 166, 155, 101, 321, 250, 248, 249, 323, 425, 298)),
    "aarch64": (0xC00000B7, 220, 435, (97, 268, 40, 39, 41, 117, 280, 219, 217, 218, 282, 425, 241)),
}
CLONE_THREAD = 0x00010000
CLONE_NEW = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
X32 = 0x40000000  # x86-64's x32 ABI: the same audit arch, numbers from here on
_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS = 1, 38


@dataclass
class Limits:
    """What one run may use. Defaults fit a calculation or a short test; raise them for heavier code."""
    wall_s: float = 10.0  # wall-clock seconds, then killed
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU), then killed by the kernel
    memory_mb: int = 512  # address space of the interpreter (RLIMIT_AS)
    output_bytes: int = 64 * 1024  # stdout + stderr kept; past this the run is killed
    disk_mb: int = 16  # the writable /tmp folder (tmpfs size) and any one file (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass
class Result:
    """What a run did: its exit code (negative: killed by that signal), its output (capped), and why it stopped
    early, if it did ("timeout", "output", or "" when it ended by itself)."""
    returncode: int
    stdout: str
    stderr: str
    stopped: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.stopped


def check() -> str | None:
    """None when the sandbox runs here, else what is missing and how to get it (one trial run, remembered)."""
    return _missing()


@functools.cache
def _missing() -> str | None:
    if sys.platform != "linux":
        return f"the sandbox needs Linux (namespaces, seccomp); this is {sys.platform}"
    if platform.machine() not in _ARCH:
        return f"the sandbox's seccomp filter knows x86-64 and aarch64, not {platform.machine()}"
    for command, package in (("bwrap", "bubblewrap"), ("prlimit", "util-linux")):
        if shutil.which(command) is None:
            return (f"the sandbox needs the `{command}` command: install it with `apt-get install {package}` "
                    f"(Debian/Ubuntu) or your distribution's package")
    try:
        _trial()
    except RuntimeError as e:  # e.g. user namespaces disabled, or a bwrap older than 0.8 (--size, --disable-userns)
        return f"{e} (bubblewrap 0.8 or newer and unprivileged user namespaces are needed)"
    return None


def _trial() -> None:
    result = _run("print(1)", Limits())
    if result.stdout != "1\n":
        raise RuntimeError(f"the sandbox's trial run printed {result.stdout!r}, error {result.stderr.strip()!r}")


def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic-BPF program (struct sock_filter[]) of the sandbox: a foreign ABI (32-bit, x32) kills the
    process; the refused calls (`_ARCH`) and clone for a process (no CLONE_THREAD) or a namespace (CLONE_NEW*)
    fail with EPERM; clone3 fails with ENOSYS (the C library then falls back to clone, whose flags the filter can
    read); every other call is allowed."""
    arch, clone, clone3, refused = _ARCH[machine or platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|JGE|JSET (K), BPF_RET|K
    # (code, k, true label, false label): labels name instructions; jumps are offsets from the next one
    body: list[tuple[int, int, str | None, str | None]] = [
        (ld, 4, None, None),  # seccomp_data.arch
        (jeq, arch, None, "kill"),
        (ld, 0, None, None),  # seccomp_data.nr
        (jge, X32, "kill", None),
        (jeq, clone3, "enosys", None),
        *[(jeq, nr, "eperm", None) for nr in refused],
        (jeq, clone, "clone", None),
        (ret, _RET_ALLOW, None, None),
    ]
    labels = {"clone": len(body)}
    body += [(ld, 16, None, None),  # args[0] low word: clone's flags (little-endian on both arches)
             (jset, CLONE_NEW, "eperm", None), (jset, CLONE_THREAD, None, "eperm"), (ret, _RET_ALLOW, None, None)]
    for name, value in (("eperm", _RET_ERRNO | EPERM), ("enosys", _RET_ERRNO | ENOSYS), ("kill", _RET_KILL)):
        labels[name] = len(body)
        body.append((ret, value, None, None))
    prog = b""
    for pc, (code, k, true, false) in enumerate(body):
        jt, jf = (labels[true] - pc - 1 if true else 0), (labels[false] - pc - 1 if false else 0)
        prog += struct.pack("=HBBI", code, jt, jf, k)
    return prog


def _bind_args() -> list[str]:
    """The read-only world: the interpreter's installation and the system libraries it links."""
    args: list[str] = []
    for path in ("/usr", "/lib", "/lib64", "/lib32", "/bin"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        args += ["--ro-bind", prefix, prefix]
    return args


def _limits(limits: Limits) -> list[str]:
    """util-linux's `prlimit` in front of bwrap: the limits are set before bwrap runs and inherited by the code
    (set from outside, not by a preexec function: tools run in threads, where a preexec function is unsafe)."""
    mb = 2**20
    return ["prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}", f"--as={limits.memory_mb * mb}",
            f"--fsize={limits.disk_mb * mb}", f"--nofile={limits.open_files}", "--core=0", "--"]


def run_python(code: str, limits: Limits | None = None, stdin: str = "") -> Result:
    """Run `code` with the standard-library interpreter inside the sandbox (module docstring), within `limits`.
    What the code does is a Result; a sandbox that cannot start here is a RuntimeError saying why."""
    missing = _missing()
    if missing:
        raise RuntimeError(missing)
    return _run(code, limits or Limits(), stdin)


def _run(code: str, limits: Limits, stdin: str = "") -> Result:
    interpreter = os.path.realpath(sys.executable)
    size = str(limits.disk_mb * 2**20)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigrpo-sandbox-") as host:
        script = os.path.join(host, "main.py")
        with open(script, "w") as f:
            f.write(code)
        cmd = [*_limits(limits), "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534",
               "--gid", "65534", "--die-with-parent", "--new-session", "--cap-drop", "ALL", *_bind_args(),
               "--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--size", size, "--tmpfs",
               "/tmp", "--ro-bind", script, "/sandbox/main.py", "--remount-ro", "/dev", "--remount-ro", "/",
               "--chdir", "/tmp", "--setenv", "HOME", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
               "--seccomp", "{fd}", interpreter, "-I", "-S", "/sandbox/main.py"]
        rules_r, rules_w = os.pipe()
        try:
            os.write(rules_w, seccomp_filter())  # < 64 KiB: fits the pipe before bwrap reads it
            os.close(rules_w)
            cmd[cmd.index("{fd}")] = str(rules_r)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(rules_r,), start_new_session=True,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        finally:
            os.close(rules_r)
        try:
            out, err, stopped = _collect(proc, stdin.encode(), limits)
        finally:  # whatever happened while reading: nothing of the sandbox outlives the call
            if proc.poll() is None:
                _kill(proc)
    stderr = err.decode(errors="replace")
    if proc.returncode != 0 and stderr.startswith(("bwrap: ", "prlimit: ")):
        raise RuntimeError(f"the sandbox could not start: {stderr.strip()}")
    return Result(proc.returncode, out.decode(errors="replace"), stderr, stopped, time.perf_counter() - t0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap and everything in its PID namespace
    except ProcessLookupError:
        pass
    proc.wait()


def _collect(proc: subprocess.Popen, stdin: bytes, limits: Limits) -> tuple[bytes, bytes, str]:
    """Read stdout and stderr until the process ends, the wall limit passes or the output cap is reached (then
    the whole process group is killed); the output kept is at most `output_bytes`."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in bufs:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    deadline, stopped = time.monotonic() + limits.wall_s, ""
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            stopped = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = key.fileobj.read(65536)  # type: ignore[union-attr]
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            bufs[key.fileobj] += chunk  # type: ignore[index]
        if sum(len(b) for b in bufs.values()) > limits.output_bytes:
            stopped = "output"
            break
    if stopped:
        _kill(proc)
    proc.wait()
    sel.close()
    keep = limits.output_bytes
    out = bytes(bufs[proc.stdout][:keep])
    return out, bytes(bufs[proc.stderr][:max(0, keep - len(out))]), stopped
