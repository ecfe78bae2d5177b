"""A one-node Slurm cluster on loopback, all of it in one directory: munged (authentication),
MariaDB + slurmdbd (accounting: `sacct`, where submitit reads a job's state, and so learns that
a cancelled job ended), slurmctld and slurmd, each on a free port, with Debian's `slurm-wlm`,
`slurmdbd`, `slurm-wlm-mysql-plugin`, `munge` and `mariadb-server` packages. Nothing is written
outside the directory; the client commands (sbatch, squeue, sacct, scancel) find the cluster
through SLURM_CONF.

    python tests/slurm_cluster.py start DIR     # prints: export SLURM_CONF=DIR/slurm.conf
    python tests/slurm_cluster.py stop DIR

slurmd runs jobs as the user who submits them and must be root for that: the cluster starts as
root only (CI runs as root). No cgroups: processes are tracked by /proc (proctrack/linuxproc).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLUSTER = "lorasweep"
PARTITION = "debug"
NEEDED = ("munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr",
          "mariadb-install-db", "mariadbd")
# the daemons in the order they start (stop: the reverse)
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start here; the message says why."""


def missing() -> str | None:
    """Why no cluster can start here, or None."""
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs (this process is not root)"
    absent = [name for name in NEEDED if shutil.which(name, path=_path()) is None]
    if absent:
        return (f"{', '.join(absent)} not installed (apt-get install slurm-wlm slurmdbd "
                f"slurm-wlm-mysql-plugin munge mariadb-server; .ci/run does)")
    return None


def _path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str:
    return shutil.which(name, path=_path())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise ClusterUnavailable(f"{' '.join(cmd)} exited {proc.returncode}: "
                                 f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def node_line() -> str:
    """This machine as `slurmd -C` sees it (CPUs, sockets, cores, threads, memory), with a tenth
    of the memory kept back: a node that reports less than its configured RealMemory is
    drained."""
    out = _run([_which("slurmd"), "-C"]).stdout.splitlines()[0]
    fields = dict(part.split("=", 1) for part in out.split())
    fields["RealMemory"] = str(int(int(fields["RealMemory"]) * 0.9))
    return " ".join(f"{k}={v}" for k, v in fields.items())


def write_config(root: Path) -> Path:
    """slurm.conf and slurmdbd.conf in `root`; the path of slurm.conf."""
    host = socket.gethostname().split(".")[0]
    ports = {name: free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
    for sub in ("state", "spool", "log", "munge", "mysql"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "ports").write_text(f"{ports['mysql']}\n")
    auth = f"AuthType=auth/munge\nAuthInfo=socket={root}/munge/munge.socket\n"
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['ctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
{auth}CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# no cgroups in a container: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['dbd']}
# this cluster's own munged for the connection to slurmdbd too (Slurm takes that socket from here)
AccountingStoragePass={root}/munge/munge.socket
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# a cancelled job's processes get SIGTERM, then SIGKILL this many seconds later
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
{node_line()} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    dbd = root / "slurmdbd.conf"
    dbd.write_text(f"""{auth}DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['dbd']}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mysql']}
StorageUser=root
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it may hold a password)
    return conf


def env_for(root: Path) -> dict[str, str]:
    """The environment that points Slurm's commands and daemons at this cluster."""
    return {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": _path()}


def wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise ClusterUnavailable(f"{what} not ready after {timeout:.0f} s\n{tail}")


def start_munge(root: Path) -> None:
    key = root / "munge" / "munge.key"
    _run([_which("mungekey"), "--create", f"--keyfile={key}"])
    key.chmod(0o600)
    _run([_which("munged"), f"--socket={root}/munge/munge.socket", f"--key-file={key}",
          f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
          f"--seed-file={root}/munge/munged.seed", "--force"])


def start_mariadb(root: Path) -> None:
    """A MariaDB server for slurmdbd alone: loopback, no grant tables (anyone on this machine
    may use it: a throwaway accounting database)."""
    data = root / "mysql"
    _run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
          "--skip-test-db", "--auth-root-authentication-method=normal"])
    port = (root / "ports").read_text().split()[0]
    log = root / "log" / "mariadb.log"
    subprocess.Popen([_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                      f"--port={port}", "--bind-address=127.0.0.1",
                      f"--socket={root}/mysql.sock", f"--pid-file={root}/mariadbd.pid",
                      f"--log-error={log}", "--skip-grant-tables", "--innodb-buffer-pool-size=32M",
                      "--skip-log-bin"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for("mariadbd", lambda: _port_open(int(port)), 60, log)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ports(root: Path) -> dict[str, int]:
    text = (root / "slurm.conf").read_text() + (root / "slurmdbd.conf").read_text()
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key in ("SlurmctldPort", "SlurmdPort", "DbdPort"):
            found[key] = int(value)
    return found


def start(root: str | os.PathLike) -> dict[str, str]:
    """Start the cluster in `root` (a new or empty directory) and wait until its node is idle;
    the environment to use it (SLURM_CONF). Raises ClusterUnavailable with the reason."""
    reason = missing()
    if reason:
        raise ClusterUnavailable(reason)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        write_config(root)
        env = env_for(root)
        ports = _ports(root)
        start_munge(root)
        start_mariadb(root)
        _run([_which("slurmdbd")], env=env)
        wait_for("slurmdbd", lambda: _port_open(ports["DbdPort"]), 60,
                 root / "log" / "slurmdbd.log")
        _run([_which("sacctmgr"), "-i", "add", "cluster", CLUSTER], env=env)
        _run([_which("slurmctld")], env=env)
        wait_for("slurmctld", lambda: _port_open(ports["SlurmctldPort"]), 60,
                 root / "log" / "slurmctld.log")
        _run([_which("slurmd")], env=env)
        wait_for("the node (idle in sinfo)", lambda: node_state(env) == "idle", 60,
                 root / "log" / "slurmd.log")
    except BaseException:
        stop(root)
        raise
    return env


def node_state(env: dict[str, str]) -> str:
    proc = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def stop(root: str | os.PathLike) -> None:
    """Stop every daemon started in `root` (SIGTERM, then SIGKILL after 15 s)."""
    root = Path(root)
    for name in reversed(DAEMONS):
        pidfile = root / f"{name}.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        _signal(pid, signal.SIGTERM)
        deadline = time.time() + 15
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own child not reaped yet) has ended
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "stop":
        stop(argv[1])
        return 0
    try:
        env = start(argv[1])
    except ClusterUnavailable as exc:
        print(f"no Slurm cluster: {exc}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
