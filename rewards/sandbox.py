"""Run untrusted Python in a bubblewrap sandbox and read back what it reports.

    out = run_python(source, stdin=payload, limits=Limits(time_s=5, memory_mb=512))
    out.results    # bytes the program wrote to its result pipe (fd number in sys.argv[1])
    out.fault      # None, or "timeout" / "memory" / "output limit" / "disk" (the parent's verdicts)

What the program sees (bubblewrap, Debian package ``bubblewrap``): ``/usr`` (with the
``/bin``, ``/lib``... links) and the interpreter's prefix read-only, a fresh ``/proc`` and a
minimal ``/dev``, and one private writable work dir, ``/tmp`` (a tmpfs of
``Limits.work_dir_mb``; also the cwd and HOME), plus a small ``/dev/shm`` for
multiprocessing's semaphores. Nothing else of the host exists inside: not the repo, not
the datasets, not the host's ``/tmp``, not ``/etc`` (only ``ld.so.cache``). Own network
namespace (no network, no DNS), own PID, IPC and UTS namespaces, a new session, no
environment but a few variables.
The interpreter is the caller's own (``sys.base_prefix``), run with ``-S -s``: standard
library only.

Identity. RLIMIT_NPROC is not enforced for uid 0, also not for uid 0 mapped to another uid
by a user namespace (measured), so the program must run as a real non-root uid. As root,
bwrap runs privileged (no user namespace) and ``setpriv`` starts the program as uid/gid
``UID_BASE + caller pid`` — a uid per reward worker, so one sandbox's processes never count
against another's limit (one sandbox at a time per calling process) — with no capabilities,
an empty bounding set and no_new_privs. As another user, bwrap
makes a user namespace and the program keeps that user's uid.

Limits. ``prlimit`` inside sets address space, CPU seconds, file size, open files and
processes (threads count) for the program and everything it starts. The parent watches
the rest: wall-clock time, the summed RSS of all processes in the sandbox (a per-process
address-space limit alone would let a fork bomb multiply it), files in the tmpfs (empty
files cost kernel memory but no tmpfs space) and whether it is full, and bytes of output.
Any of these ends the run with a fault; so does a program still leaving processes running
after its last line (`run_python`'s ``end_line``).

No process outlives the call: the sandbox's PID namespace dies with its init, which the
parent kills at the end of every run (SIGKILL to the init kills the whole namespace), and
``--die-with-parent`` plus ``setpriv --pdeathsig`` end it if the caller dies first.

Where ``bwrap`` (or util-linux's ``setpriv``/``prlimit``) is missing or cannot create a
sandbox, `require_sandbox` raises `SandboxUnavailable` saying what to install; nothing
here ever runs the program without the sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

WORK_DIR = "/tmp"
UID_BASE = 2_000_000_000  # + the caller's pid: far from real users and from subuid ranges
POLL_S = 0.05  # how often the parent checks memory and files while the program runs
SHM_MB = 8
INSTALL_HINT = ("install bubblewrap: `apt-get install -y bubblewrap` (Debian/Ubuntu; "
                "`dnf install bubblewrap` on Fedora); `make install` does it when run as root")


class SandboxUnavailable(RuntimeError):
    """bubblewrap (or a tool it needs) is missing or cannot create a sandbox here."""


@dataclass(frozen=True)
class Limits:
    time_s: float = 5.0  # wall clock, start-up included
    memory_mb: int = 512  # summed RSS of the sandbox's processes; also each one's address space
    processes: int = 16  # processes and threads of the program (RLIMIT_NPROC)
    work_dir_mb: int = 32  # size of the /tmp tmpfs; also the largest file it may write
    work_dir_files: int = 2048  # files (inodes) in /tmp and /dev/shm together
    open_files: int = 64
    output_bytes: int = 1 << 20  # stdout + stderr
    result_bytes: int = 16 << 20  # what it writes to the result pipe


@dataclass
class RunOutput:
    results: bytes  # everything written to the result pipe
    output: bytes  # the last 4 KiB of stdout + stderr
    exit_code: Optional[int]  # bwrap's: the program's code, 128 + N when signal N killed it
    fault: Optional[str] = None  # "timeout", "memory", "output limit", "disk"
    detail: str = ""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        what = "bubblewrap" if name == "bwrap" else "util-linux"
        raise SandboxUnavailable(
            f"the code reward runs solutions in a sandbox and needs `{name}` ({what}), which is not on PATH; "
            + (INSTALL_HINT if name == "bwrap" else f"install {what}")
            + ". Untrusted code is never run without the sandbox.")
    return path


def require_sandbox() -> None:
    """Raise `SandboxUnavailable` (saying what to install) unless a sandbox can be started here."""
    _check(_tool("bwrap"), _tool("setpriv"), _tool("prlimit"))


@functools.lru_cache(maxsize=None)
def _check(bwrap: str, setpriv: str, prlimit: str) -> None:
    source = "import os, sys; os.write(int(sys.argv[1]), b'%d' % os.getuid())"
    out = _run(source, b"", Limits(time_s=20.0), (bwrap, setpriv, prlimit), "cispo-sandbox-check", None)
    expected = str(sandbox_uid()).encode()
    if out.fault or out.exit_code != 0 or out.results != expected:
        why = out.output.decode("utf-8", "replace").strip() or out.detail or f"exit code {out.exit_code}"
        raise SandboxUnavailable(
            f"bubblewrap ({bwrap}) is installed but cannot start a sandbox here: {why}. As a non-root user it "
            "needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "user.max_user_namespaces > 0); as root it needs mount and PID namespaces.")


def sandbox_uid() -> int:
    """The uid this process's sandboxes run as: its own per-process uid as root, else the caller's."""
    return UID_BASE + os.getpid() if os.geteuid() == 0 else os.geteuid()


def run_python(source: str, stdin: bytes, limits: Limits, *, end_line: Optional[bytes] = None,
               marker: str = "cispo-sandbox") -> RunOutput:
    """Run `source` (``python -c``) in the sandbox with `stdin`; argv[1] is the result pipe's fd
    number, argv[2] is `marker` (visible in the host's process table, for tests).

    The run ends when the program exits, or as soon as it writes `end_line` (a whole line) to the
    result pipe: the parent then checks the sandbox as the program left it (memory, files, a full
    work dir, other processes still running) and kills it, so a program may simply wait after
    its last line.
    """
    require_sandbox()
    tools = (shutil.which("bwrap"), shutil.which("setpriv"), shutil.which("prlimit"))
    return _run(source, stdin, limits, tools, marker, end_line)


def _interpreter() -> tuple[str, list[str]]:
    """The interpreter to run inside, and the host folders it needs besides /usr."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    keep: list[str] = []
    for folder in sorted({os.path.realpath(sys.base_prefix), os.path.dirname(exe)}):  # parents first
        if not any(folder == k or folder.startswith(k + "/") for k in ["/usr", *keep]):
            keep.append(folder)
    return exe, keep


def _command(tools: tuple[str, str, str], limits: Limits, info_fd: int, result_fd: int, source: str,
             marker: str) -> list[str]:
    bwrap, setpriv, prlimit = tools
    root = os.geteuid() == 0
    exe, folders = _interpreter()
    cmd = [setpriv, "--pdeathsig=KILL", "--", bwrap]
    if root:  # privileged bwrap: no user namespace, so the uid below is a real one
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        cmd += ["--unshare-all"]
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            cmd += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            cmd += ["--ro-bind", name, name]
    cmd += ["--perms", "0755", "--dir", "/etc", "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for folder in folders:
        # bwrap copies the host's modes for the parents it creates (/root is 0700): open them up.
        parts = folder.strip("/").split("/")
        for k in range(1, len(parts)):
            cmd += ["--perms", "0755", "--dir", "/" + "/".join(parts[:k])]
        cmd += ["--ro-bind", folder, folder]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.work_dir_mb << 20), "--tmpfs", WORK_DIR,
            "--perms", "1777", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm",
            "--remount-ro", "/", "--chdir", WORK_DIR, "--clearenv"]
    for key, value in (("PATH", "/usr/local/bin:/usr/bin:/bin"), ("HOME", WORK_DIR), ("TMPDIR", WORK_DIR),
                       ("LANG", "C.UTF-8"), ("PYTHONHASHSEED", "0"), ("OMP_NUM_THREADS", "1")):
        cmd += ["--setenv", key, value]
    cmd += ["--info-fd", str(info_fd), "--"]
    if root:
        uid = sandbox_uid()
        cmd += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--bounding-set=-all", "--no-new-privs",
                "--"]
    cpu = int(limits.time_s) + 1
    cmd += [prlimit, f"--as={limits.memory_mb << 20}", f"--cpu={cpu}:{cpu + 1}", f"--fsize={limits.work_dir_mb << 20}",
            "--core=0", f"--nofile={limits.open_files}", f"--nproc={limits.processes}", "--"]
    return cmd + [exe, "-S", "-s", "-B", "-c", source, str(result_fd), marker]


def _run(source: str, stdin: bytes, limits: Limits, tools: tuple, marker: str,
         end_line: Optional[bytes]) -> RunOutput:
    stdin_fd = os.memfd_create("cispo-sandbox-stdin")  # a file, so no writer has to keep up with the reader
    with open(stdin_fd, "wb", closefd=False) as f:
        f.write(stdin)
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    info_r, info_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        proc = subprocess.Popen(_command(tools, limits, info_w, res_w, source, marker), stdin=stdin_fd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(info_w, res_w))
    finally:
        for fd in (stdin_fd, info_w, res_w):
            os.close(fd)
    info = _read_all(info_r, limits.time_s + 10)  # bwrap writes it once the namespace exists, then closes it
    init_pid, pidfd = None, None
    try:
        init_pid = int(json.loads(info)["child-pid"])
        pidfd = os.pidfd_open(init_pid)  # the sandbox's init: killing it kills the namespace
    except (ValueError, KeyError, TypeError, ProcessLookupError):
        pass
    try:
        return _watch(proc, res_r, init_pid, limits, end_line)
    finally:
        _end(proc, pidfd)
        os.close(res_r)


def _read_all(fd: int, timeout: float) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    try:
        while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data


def _watch(proc: subprocess.Popen, res_r: int, init_pid: Optional[int], limits: Limits,
           end_line: Optional[bytes]) -> RunOutput:
    deadline = time.monotonic() + limits.time_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "output")
    sel.register(res_r, selectors.EVENT_READ, "results")
    chunks = {"output": bytearray(), "results": bytearray()}
    counts = {"output": 0, "results": 0}
    caps = {"output": limits.output_bytes, "results": limits.result_bytes}
    end = None if end_line is None else b"\n" + end_line.rstrip(b"\n") + b"\n"
    out = RunOutput(b"", b"", None)
    ended, next_check = False, 0.0
    try:
        while sel.get_map() and not ended:
            left = deadline - time.monotonic()
            if left <= 0:
                out.fault, out.detail = "timeout", f"still running after the {limits.time_s:g}s wall-clock limit"
                break
            for key, _ in sel.select(min(POLL_S, left)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                name = key.data
                counts[name] += len(data)
                buf = chunks[name]
                buf += data
                if name == "output" and len(buf) > 8192:
                    del buf[:-4096]
                if name == "results" and end is not None:
                    start = max(0, len(buf) - len(data) - len(end))
                    ended = ended or end in (b"\n" if start == 0 else b"") + buf[start:]
            over = [n for n in counts if counts[n] > caps[n]]
            if over:
                what = "stdout/stderr" if over[0] == "output" else "the tested values"
                out.fault, out.detail = "output limit", f"{what} exceeded {caps[over[0]]} bytes"
                break
            if init_pid is not None and (ended or time.monotonic() >= next_check):
                next_check = time.monotonic() + POLL_S
                if _over_limits(init_pid, limits, out) or (ended and _left_running(init_pid, out)):
                    break
        if out.fault is None and not ended:
            try:  # the program closed its pipes; it should be exiting
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out.fault, out.detail = "timeout", f"still running after the {limits.time_s:g}s wall-clock limit"
    finally:
        sel.close()
    out.results = bytes(chunks["results"])
    out.output = bytes(chunks["output"][-4096:])
    out.exit_code = proc.returncode
    return out


def _over_limits(init_pid: int, limits: Limits, out: RunOutput) -> bool:
    rss = sum(_rss(p) for p in _tree(init_pid))
    if rss > limits.memory_mb << 20:
        out.fault, out.detail = "memory", f"the sandbox's processes used {rss >> 20} MiB (limit {limits.memory_mb} MiB)"
        return True
    files = 0
    for folder, size_mb in ((WORK_DIR, limits.work_dir_mb), ("/dev/shm", SHM_MB)):
        try:
            st = os.statvfs(f"/proc/{init_pid}/root{folder}")
        except OSError:  # the sandbox is gone, or /proc of another user is closed to us
            continue
        if st.f_blocks * st.f_frsize != size_mb << 20:  # not mounted yet: that is still the host's folder
            continue
        files += st.f_files - st.f_ffree
        if st.f_bavail == 0:
            out.fault, out.detail = "disk", f"{folder} is full"
            return True
    if files > limits.work_dir_files:
        out.fault, out.detail = "disk", f"{files} files in the work dir (limit {limits.work_dir_files})"
        return True
    return False


def _left_running(init_pid: int, out: RunOutput) -> bool:
    """Whether processes besides the program are still running (not zombies) in the sandbox
    after its last line: daemons (double fork, setsid) waiting to act later, or children it
    did not wait for. The program is the init's oldest child."""
    kids = sorted((int(st[19]), p) for p in _children(init_pid) if (st := _stat(p)))  # by start time
    program = kids[0][1] if kids else None
    others = [p for p in _tree(init_pid) if p not in (init_pid, program) and (_stat(p) or ["Z"])[0] != "Z"]
    if others:
        out.fault = "escape attempt"
        out.detail = f"{len(others)} process(es) still running after the program finished (daemons, unjoined children)"
        return True
    return False


def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/PID/stat after the command name (state first), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass  # exited meanwhile
    return kids


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(_children(p))
    return found


def _rss(pid: int) -> int:
    """Resident memory of `pid` in bytes (pages shared after a fork count in each: conservative)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _end(proc: subprocess.Popen, pidfd: Optional[int]) -> None:
    """Kill the sandbox's PID namespace (a no-op when it already ended) and wait until it is gone."""
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if pidfd is not None:
        select.select([pidfd], [], [], 5)  # readable once the init (and so every process inside) is dead
        os.close(pidfd)
    if proc.stdout is not None:
        proc.stdout.close()
