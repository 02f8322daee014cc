"""What the sandbox tests look at on the host: live sandbox processes and files left behind.

pytest puts this folder on sys.path (no __init__.py), so the tests import it by name.
"""

import os
import secrets
from pathlib import Path

from rewards.sandbox import UID_BASE

TOKEN = f"cispohostile{secrets.token_hex(4)}"  # in every name a hostile program tries to create
REPO = Path(__file__).resolve().parents[2]
NUL = bytes(1)
HOST_PLACES = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), REPO, REPO / "tests" / "rewards", Path.cwd(),
               Path.home()]


def sandbox_uids(pids=None) -> set[int]:
    """The uids sandboxes started by these processes (default: this one) run as; as non-root they
    keep the caller's uid, which tells nothing: then only the TOKEN marks them."""
    if os.geteuid() != 0:
        return set()
    return {UID_BASE + p for p in (pids or [os.getpid()])}


def sandbox_processes(uids=None) -> list[str]:
    """Live processes (zombies included) running as one of `uids` or with TOKEN on their command line."""
    uids = {str(u) for u in (sandbox_uids() if uids is None else uids)}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        if uids & set(uid_line.split()[1:]) or TOKEN.encode() in cmdline:
            found.append(f"{name}: {cmdline.replace(NUL, b' ')[:120]!r}")
    return found


def leftovers() -> list[Path]:
    """Files or folders with TOKEN in their name in the host places a program could aim at."""
    return [p for d in HOST_PLACES if d.is_dir() for p in d.iterdir() if TOKEN in p.name]
