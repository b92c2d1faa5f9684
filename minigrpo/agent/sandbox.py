"""The sandbox that runs model-written Python (the `python` tool, and code rewards): bubblewrap + seccomp + limits.

What contains the code, and why that is enough (no string filtering anywhere):
- **bubblewrap** (`bwrap`, Debian's `bubblewrap`; the tool Flatpak runs apps in) starts it in new namespaces
  (`--unshare-all`): its own network namespace with no interface but a down loopback (no network, no host
  sockets, abstract ones included), its own PID namespace (it sees and can signal only its own processes: the
  trainer is out of reach; when the sandbox's first process dies, every process in it dies), its own mount
  namespace holding only what is listed here: the Python installation and the system libraries read-only, a
  fresh /proc and minimal /dev, and one writable folder, a size-capped tmpfs at /work (`--size`), gone when the
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

import os
import platform
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# (audit arch, clone, fork, vfork, clone3): aarch64 has no fork nor vfork (0xFFFFFFFF: no call has that number)
_ARCH = {"x86_64": (0xC000003E, 56, 57, 58, 435), "aarch64": (0xC00000B7, 220, 0xFFFFFFFF, 0xFFFFFFFF, 435)}
CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_KILL, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
EPERM, ENOSYS = 1, 38


@dataclass
class Limits:
    """What one run may use. Defaults fit a calculation or a short test; raise them for heavier code."""
    wall_s: float = 10.0  # wall-clock seconds, then killed
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU), then killed by the kernel
    memory_mb: int = 512  # address space of the interpreter (RLIMIT_AS)
    output_bytes: int = 64 * 1024  # stdout + stderr kept; past this the run is killed
    disk_mb: int = 16  # the writable /work folder (tmpfs size) and any one file (RLIMIT_FSIZE)
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
    """None when the sandbox can run here, else what is missing and how to get it."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (namespaces, seccomp); this is {sys.platform}"
    if platform.machine() not in _ARCH:
        return f"the sandbox's seccomp filter knows x86-64 and aarch64, not {platform.machine()}"
    if shutil.which("bwrap") is None:
        return ("the sandbox needs bubblewrap (the `bwrap` command): install it with `apt-get install bubblewrap` "
                "(Debian/Ubuntu) or your distribution's package")
    return None


def seccomp_filter(machine: str | None = None) -> bytes:
    """The classic-BPF program (struct sock_filter[]) that refuses new processes and allows everything else."""
    arch, clone, fork, vfork, clone3 = _ARCH[machine or platform.machine()]

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JSET|K, BPF_RET|K
    prog = [  # jumps are relative: the target is the next instruction + the offset
        op(ld, 4),  # 0: seccomp_data.arch
        op(jeq, arch, 0, 11),  # 1: another ABI (e.g. 32-bit calls) -> 13 kill
        op(ld, 0),  # 2: seccomp_data.nr
        op(jeq, clone3, 8, 0),  # 3: -> 12 ENOSYS (the C library then falls back to clone)
        op(jeq, fork, 6, 0),  # 4: -> 11 EPERM
        op(jeq, vfork, 5, 0),  # 5: -> 11 EPERM
        op(jeq, clone, 1, 0),  # 6: -> 8
        op(ret, _RET_ALLOW),  # 7: any other call
        op(ld, 16),  # 8: args[0] low word: clone's flags (little-endian on both arches)
        op(jset, CLONE_THREAD, 0, 1),  # 9: a thread -> 10, a process -> 11
        op(ret, _RET_ALLOW),  # 10
        op(ret, _RET_ERRNO | EPERM),  # 11
        op(ret, _RET_ERRNO | ENOSYS),  # 12
        op(ret, _RET_KILL),  # 13
    ]
    return b"".join(prog)


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


def _limit(limits: Limits):  # noqa: ANN202  (a preexec function)
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.disk_mb * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(code: str, limits: Limits | None = None, stdin: str = "") -> Result:
    """Run `code` with the standard-library interpreter inside the sandbox (module docstring), within `limits`."""
    limits = limits or Limits()
    missing = check()
    if missing:
        raise RuntimeError(missing)
    interpreter = os.path.realpath(sys.executable)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigrpo-sandbox-") as host:
        script = os.path.join(host, "main.py")
        with open(script, "w") as f:
            f.write(code)
        rules_r, rules_w = os.pipe()
        os.write(rules_w, seccomp_filter())  # < 64 KiB: fits the pipe before bwrap reads it
        os.close(rules_w)
        cmd = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent",
               "--new-session", "--cap-drop", "ALL", *_bind_args(), "--proc", "/proc", "--dev", "/dev",
               "--size", str(limits.disk_mb * 2**20), "--tmpfs", "/work", "--ro-bind", script, "/sandbox/main.py",
               "--chdir", "/work", "--setenv", "HOME", "/work", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
               "--seccomp", str(rules_r), interpreter, "-I", "-S", "/sandbox/main.py"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(rules_r,), preexec_fn=_limit(limits), start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        os.close(rules_r)
        out, err, stopped = _collect(proc, stdin.encode(), limits)
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), stopped,
                  time.perf_counter() - t0)


def _collect(proc: subprocess.Popen, stdin: bytes, limits: Limits) -> tuple[bytes, bytes, str]:
    """Read stdout and stderr until the process ends, the wall limit passes or the output cap is reached (then
    the whole process group is killed); the output kept is at most `output_bytes`."""
    import selectors  # local: only the sandbox needs it

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
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    sel.close()
    keep = limits.output_bytes
    out = bytes(bufs[proc.stdout][:keep])
    return out, bytes(bufs[proc.stderr][:max(0, keep - len(out))]), stopped
