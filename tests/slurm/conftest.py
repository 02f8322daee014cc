"""A real single-node Slurm for the `slurm` tests, started by hand (no systemd).

The session fixture `slurm_cluster`:
- installs Debian's `slurm-wlm` and `munge` when missing (only as root and only where
  apt-get works; otherwise the tests skip and say why);
- gives every pytest session its own cluster: its own state folder, its own munged on its
  own socket, slurmctld/slurmd on free ports, a unique ClusterName — so two sessions on
  one machine (two engineers running `make test`) do not meet;
- cleans up after aborted sessions: a folder under /tmp/cispo-slurm-tests/ whose owning
  pytest process is gone has its daemons killed (by the pids it recorded, checked
  against /proc/<pid>/cmdline) and is removed before a new cluster starts;
- runs two slurmd on this one machine (the hostname, and `<hostname>-2` with
  NodeHostname=<hostname>): partition `debug` has the first, `pair` both, so 2-node jobs
  and their srun steps are real;
- waits until `sinfo` shows the nodes idle, sets SLURM_CONF for the session (sbatch,
  scontrol, and the jobs' own srun find the cluster through it), and at teardown stops
  what it started (`scontrol shutdown`, then munged).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("CISPO_SLURM_TEST_ROOT", "/tmp/cispo-slurm-tests"))
DAEMON_ORDER = ("slurmd", "slurmctld", "munged")  # stop order (pid files: <daemon>[-<node>].pid)


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    node: str  # the machine's own hostname; partition `partition` holds only it
    partition: str
    cpus: int
    env: dict
    # A second slurmd on the same machine (NodeHostname=node): partition `pair_partition`
    # holds both, so a 2-node job, its srun steps and a 2-node Ray cluster are real.
    node2: str = ""
    pair_partition: str = "pair"

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the job is purged)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        fields = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float, poll: float = 2.0) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s; last: {info}")

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job of this cluster and wait until they are gone (a failed test
        must not leave a job holding the node's CPUs for the next one)."""
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not ids:
            return
        self.run("scancel", *ids, check=False)
        deadline = time.time() + timeout
        while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
            time.sleep(1)

    def release_requeued(self, job_id: str, restarts: int, timeout: float = 120) -> None:
        """Slurm holds a requeued job PENDING for 120 s (Reason=BeginTime) before it may
        start again; tests skip that wait once the requeue has happened (the job is seen
        PENDING with the restart count: polling each second cannot miss that window)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if int(info.get("Restarts", 0)) >= restarts and info.get("JobState") == "PENDING":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            time.sleep(1)
        raise AssertionError(f"job {job_id} was not requeued ({restarts} restarts) within {timeout:.0f}s: {self.job(job_id)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_recorded(folder: Path) -> None:
    """Stop the daemons an earlier session recorded in `folder` (only if the pid still runs
    a command that names this folder, so a recycled pid is never hit)."""
    def order(p: Path) -> int:
        return next((i for i, d in enumerate(DAEMON_ORDER) if p.name.startswith(d)), len(DAEMON_ORDER))

    pidfiles = sorted(folder.glob("*.pid"), key=order)
    for pidfile in pidfiles:
        if pidfile.name == "owner.pid":
            continue
        try:
            pid = int(pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if str(folder) in cmdline:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def _reap_stale() -> None:
    if not ROOT.is_dir():
        return
    for folder in ROOT.iterdir():
        owner_file = folder / "owner.pid"
        try:
            owner = int(owner_file.read_text())
        except (OSError, ValueError):
            owner = -1
        if owner > 0 and owner != os.getpid() and _alive(owner):
            continue  # another live session's cluster
        _kill_recorded(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_installed() -> None:
    if all(shutil.which(x) for x in ("sbatch", "slurmctld", "slurmd", "scontrol")) and Path("/usr/sbin/munged").exists():
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"apt-get install slurm-wlm munge failed: {r.stderr.strip()[-500:]}")


# KillWait (Slurm's SIGKILL after its SIGTERM) is 10 s, not the usual 30: every requeue waits it
# out (the job script lets Slurm end a requeued attempt), and a driver saves its checkpoint on
# SIGTERM in about a second here.
SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=3600
FirstJobId={first_job_id}
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={slurmd_port} CPUs={cpus} State=UNKNOWN
NodeName={node2} NodeHostname={node} NodeAddr=127.0.0.1 Port={slurmd2_port} CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=pair Nodes={node},{node2} MaxTime=INFINITE State=UP
"""


def _start(folder: Path) -> SlurmCluster:
    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    partition = "debug"
    munge_dir = folder / "munge"
    munge_dir.mkdir()
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    munge_dir.chmod(0o755)  # munged wants its socket folder executable by all
    munge_socket = munge_dir / "munge.socket"
    # The socket's folder must be reachable by root clients; munge owns it.
    subprocess.run(
        [
            "runuser", "-u", "munge", "--", "/usr/sbin/munged",
            f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
            f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed",
        ],
        check=True, capture_output=True, text=True, timeout=30,
    )  # forks into the background
    (folder / "munged.pid").write_text((munge_dir / "munged.pid").read_text())

    (folder / "state").mkdir()
    node2 = f"{node}-2"
    conf = folder / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            cluster=f"cispotest{os.getpid()}", node=node, node2=node2, ctld_port=_free_port(),
            slurmd_port=_free_port(), slurmd2_port=_free_port(),
            munge_socket=munge_socket, dir=folder, cpus=cpus, partition=partition,
            # job ids (hence Ray port slots and temp dirs) apart from another session's cluster
            first_job_id=random.randrange(1000, 1_000_000),
        )
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, capture_output=True, text=True, timeout=60)
    for name in (node, node2):
        subprocess.run(["slurmd", "-f", str(conf), "-N", name], env=env, check=True, capture_output=True, text=True, timeout=60)
    cluster = SlurmCluster(dir=folder, conf=conf, node=node, partition=partition, cpus=cpus, env=env, node2=node2)
    deadline = time.time() + 60
    state = ""
    while time.time() < deadline:
        r = cluster.run("sinfo", "-h", "-N", "-n", f"{node},{node2}", "-o", "%T", check=False)
        state = " ".join(sorted(set(r.stdout.split())))
        if state == "idle" and len(r.stdout.split()) >= 2:
            return cluster
        time.sleep(1)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted(folder.glob("slurm*.log")))
    raise RuntimeError(f"Slurm nodes {node},{node2} not idle after 60 s (sinfo: {state!r}); logs:\n{logs}")


def _stop(cluster: SlurmCluster) -> None:
    cluster.cancel_all()  # slurmstepd and its jobs outlive `scontrol shutdown`
    cluster.run("scontrol", "shutdown", check=False)
    deadline = time.time() + 20
    while time.time() < deadline:
        pids = []
        for pidfile in cluster.dir.glob("slurm*.pid"):
            try:
                pids.append(int(pidfile.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        if not any(_alive(p) for p in pids):
            break
        time.sleep(0.5)
    _kill_recorded(cluster.dir)  # whatever is left (munged always)


@pytest.fixture(scope="session")
def slurm_cluster():
    _ensure_installed()
    ROOT.mkdir(parents=True, exist_ok=True)
    ROOT.chmod(0o755)
    _reap_stale()
    folder = ROOT / f"s{os.getpid()}"
    folder.mkdir()
    folder.chmod(0o755)
    (folder / "owner.pid").write_text(str(os.getpid()))
    try:
        cluster = _start(folder)
    except BaseException:
        # Slurm is installed but does not come up: that is an error to see, not a skip.
        _kill_recorded(folder)
        raise
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        _stop(cluster)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _cancel_jobs_after_test(request):
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()
