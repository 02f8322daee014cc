"""The program the code reward runs inside the sandbox (rewards/sandbox.py); standard library only.

argv: RESULT_FD MARKER. stdin: JSON ``{"code": solution, "tests": [[step, ...], ...]}``, a step
being ``["exec", source]`` (a test's setup statement) or ``["eval", source, leaf]`` (an
expression whose value the parent needs). It runs the solution, then each test's steps in
the solution's namespace, and writes one JSON object per line to RESULT_FD:

    {"k": "value", "t": test, "leaf": leaf, "v": encoded}   a value, as plain tagged data
    {"k": "leaf_error", "t": test, "leaf": leaf, "e": msg}  evaluating it raised (or it cannot be encoded)
    {"k": "setup_error", "t": test, "e": msg}               a setup statement raised; the test's other steps are skipped
    {"k": "flag", "kind": "network" | "escape attempt", "e": msg}   a forbidden action (also blocked)
    {"k": "fault", "kind": ..., "e": msg}                   the run cannot go on (syntax error, exit, memory, ...)
    {"k": "done"}                                           the last line; then it waits to be killed

The parent checks the sandbox once "done" arrives (leftover daemons, a full work dir) and kills it.
Forbidden, seen through an audit hook: network use (connect, bind, send to an address, DNS),
writing outside /tmp and /dev/shm, reading outside the system folders, killing a process it
did not start, starting external programs, ctypes, gc / frame-table introspection, adding
audit hooks, replacing builtins.

Nothing here decides whether a test passed: the expected values never come in, the parent
compares. The solution can tamper with anything in this process (these functions, frames,
builtins, the result pipe, the flags); that only changes which values are reported, as its
own code could, or hides a flag about an action the sandbox contains anyway. A report that
looks wrong fails the run in the parent.
"""

import builtins
import collections
import json
import os
import signal
import sys

WORK_DIR = "/tmp"
MAX_DEPTH = 64  # nesting of a reported value
MAX_VALUE_BYTES = 4 << 20
WRITABLE = (WORK_DIR, "/dev/shm", "/dev/null", "/dev/stdout", "/dev/stderr")  # its own tmpfs folders, and sinks
READABLE = WRITABLE + ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/dev", "/proc/self",
                       "/proc/thread-self", "/proc/%d" % os.getpid(), "/etc/ld.so.cache", sys.base_prefix, sys.prefix,
                       os.path.dirname(sys.executable))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod", "os.chown",
               "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
               "shutil.rmtree", "shutil.copytree", "shutil.move"}
DNS_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
              "socket.getnameinfo"}
ADDRESS_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
PROGRAM_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn",
                  "os.startfile"}
INSPECT_EVENTS = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                  "sys.addaudithook"}
DICT_TYPES = (dict, collections.OrderedDict, collections.defaultdict, collections.Counter)

_fd = int(sys.argv[1]) if __name__ == "__main__" else -1
_write, _dumps, _type, _getpid, _getppid = os.write, json.dumps, type, os.getpid, os.getppid
_harness_pid = _getpid()
_builtins = dict(vars(builtins))
_busy = []  # non-empty while the hook is at work: the events it causes itself are not audited


def emit(**msg):
    data = (_dumps(msg) + "\n").encode()
    while data:
        data = data[_write(_fd, data):]


def describe(e):
    return "%s: %s" % (_type(e).__name__, str(e)[:300])


class Unsupported(Exception):
    pass


def encode(v, depth=0):
    """Plain data as [tag, payload]; exact built-in types only (a subclass could carry its own __eq__)."""
    if depth > MAX_DEPTH:
        raise Unsupported("a value nested deeper than %d levels" % MAX_DEPTH)
    t = _type(v)
    if v is None:
        return ["n", 0]
    if t is bool:
        return ["b", v]
    if t is int:
        return ["i", hex(v)]  # hex: no 4300-digit limit
    if t is float:
        return ["f", v.hex()]
    if t is complex:
        return ["c", [v.real.hex(), v.imag.hex()]]
    if t is str:
        return ["s", v]
    if t is bytes or t is bytearray:
        return ["y", bytes(v).hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(x, depth + 1) for x in v]]
    if t in DICT_TYPES:
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in dict.items(v)]]
    raise Unsupported("a value of type %s, which cannot be compared outside the sandbox (plain data only: "
                      "None, bool, int, float, complex, str, bytes, list, tuple, dict, set)" % t.__name__)


def resolve(path):
    """The absolute, normalized path of a path argument, None for a file descriptor."""
    if isinstance(path, (str, bytes)):
        p = os.fsdecode(path)
    elif hasattr(path, "__fspath__"):
        try:
            p = os.fsdecode(os.fspath(path))
        except Exception:
            return None
    else:
        return None
    return os.path.normpath(os.path.join(os.getcwd(), p))


def under(p, roots):
    return any(p == r or p.startswith(r + "/") for r in roots)


def forbidden(event, args):
    """(kind, detail) for an action the sandbox forbids, else None."""
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        p = resolve(path)
        if p is None or under(p, WRITABLE if writes else READABLE):
            return None
        if writes:
            return ("escape attempt", "writes outside the work dir: %s" % p)
        return ("escape attempt", "reads outside the sandbox's system folders: %s" % p)
    if event in PATH_EVENTS:
        where = [p for p in map(resolve, args) if p and not under(p, WRITABLE)]
        return ("escape attempt", "%s outside the work dir: %s" % (event, where[0])) if where else None
    if event in ADDRESS_EVENTS:
        address = args[1]
        if address is None:  # a connected socket
            return None
        if isinstance(address, (str, bytes)):  # a unix socket: fine in the work dir, or abstract (per namespace)
            p = None if address[:1] in ("\0", b"\0") else resolve(address)
            return ("escape attempt", "%s to %s" % (event, p)) if p and not under(p, WRITABLE) else None
        return ("network", "%s %r" % (event, address))
    if event in DNS_EVENTS:
        return ("network", "%s %r" % (event, args[0]))
    if event == "os.kill":
        pid = args[0]
        if pid <= 1 or pid == _getppid() or (pid == _harness_pid and _getpid() != _harness_pid):
            return ("escape attempt", "os.kill(%d, %s) of a process it did not start" % (pid, args[1]))
        return None
    if event == "os.killpg":
        return ("escape attempt", "os.killpg(%s, %s)" % args[:2])
    if event in PROGRAM_EVENTS:
        return ("escape attempt", "starts an external program (%s %s)" % (event, str(args[:2])[:200]))
    if event.startswith("ctypes."):
        return ("escape attempt", "uses ctypes (%s)" % event)
    if event in INSPECT_EVENTS:
        return ("escape attempt", "inspects the harness (%s)" % event)
    return None


def audit(event, args):
    if _busy:
        return
    _busy.append(1)
    try:
        found = forbidden(event, args)
        if found:
            emit(k="flag", kind=found[0], e=found[1][:300])
    finally:
        _busy.pop()
    if found:
        raise PermissionError("blocked by the sandbox: %s: %s" % found)


def check_builtins():
    now = vars(builtins)
    changed = [k for k in set(now) | set(_builtins) if now.get(k, audit) is not _builtins.get(k, audit)]
    if changed:
        now.clear()
        now.update(_builtins)  # put them back, so that this report can still be written
        emit(k="flag", kind="escape attempt", e="replaces builtins: %s" % ", ".join(sorted(changed)[:5]))


def fatal(e):
    """A fault for exceptions that end the run, else None."""
    if isinstance(e, MemoryError):
        return "memory"
    if not isinstance(e, Exception):  # SystemExit, KeyboardInterrupt, GeneratorExit
        return "exit"
    return None


def run_tests(tests, ns):
    for t, steps in enumerate(tests):
        for step in steps:
            try:
                if step[0] == "exec":
                    exec(compile(step[1], "test_%d" % t, "exec"), ns)
                    continue
                value = eval(compile(step[1], "test_%d" % t, "eval"), ns)
            except BaseException as e:
                if fatal(e):
                    return emit(k="fault", kind=fatal(e), e="in test %d: %s" % (t, describe(e)))
                if step[0] == "exec":
                    emit(k="setup_error", t=t, e=describe(e))
                    break
                emit(k="leaf_error", t=t, leaf=step[2], e="raised " + describe(e))
                continue
            finally:
                check_builtins()
            try:
                data = encode(value)
                if len(_dumps(data)) > MAX_VALUE_BYTES:
                    raise Unsupported("a value larger than %d bytes" % MAX_VALUE_BYTES)
            except (Unsupported, RecursionError) as e:
                emit(k="leaf_error", t=t, leaf=step[2], e="returned " + str(e)[:300])
                continue
            emit(k="value", t=t, leaf=step[2], v=data)


def main():
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # input() sees an empty stdin
    os.close(null)
    with open(WORK_DIR + "/solution.py", "w") as f:  # for tests that `from solution import f`
        f.write(payload["code"])
    sys.path.insert(0, WORK_DIR)
    sys.addaudithook(audit)
    ns = {"__name__": "solution", "__builtins__": builtins}
    try:
        code = compile(payload["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as e:
        return emit(k="fault", kind="syntax error", e=describe(e))
    try:
        exec(code, ns)
    except BaseException as e:
        return emit(k="fault", kind=fatal(e) or "solution error", e="while loading the solution: " + describe(e))
    finally:
        check_builtins()
    run_tests(payload["tests"], ns)


if __name__ == "__main__":  # run with python -c; importing it does nothing
    try:
        main()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:  # the solution can break the harness itself (patched functions, closed streams)
        emit(k="fault", kind=fatal(e) or "crash", e="in the harness: " + describe(e))
    finally:
        emit(k="done")
        while True:  # the parent checks the sandbox as it is now, then kills it: no atexit handlers run
            signal.pause()
