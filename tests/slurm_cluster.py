"""A real one-node Slurm cluster for the tests, built from scratch in a temporary directory.

The Slurm templates are only really tested by Slurm itself (``#SBATCH`` parsing, array variables, ``srun``
inside a batch job, ``scancel``). :func:`running_cluster` installs Debian's ``slurm-wlm`` and ``munge`` when they
are missing (as root, through apt), then starts a private cluster that touches nothing system-wide: its own
munge key and socket, its own ``slurm.conf``, state, spool and logs, all under one temporary directory, and
free loopback ports. Clients reach it through ``SLURM_CONF``. To start the same cluster by hand (as root)::

    apt-get install -y slurm-wlm munge
    D=$(mktemp -d) && chmod 755 $D && mkdir $D/munge $D/run $D/state $D/spool $D/log && chmod 700 $D/munge
    head -c 128 /dev/urandom > $D/munge/munge.key && chmod 600 $D/munge/munge.key
    munged --key-file=$D/munge/munge.key --socket=$D/run/munge.socket --pid-file=$D/run/munged.pid \\
        --seed-file=$D/munge/munged.seed --log-file=$D/log/munged.log
    conf='import sys, slurm_cluster as s; print(s.slurm_conf(s.Path(sys.argv[1]), sys.argv[2], "root", 6817, 6818))'
    (cd tests && python -c "$conf" $D $(hostname -s)) > $D/slurm.conf     # Slurm's default ports
    export SLURM_CONF=$D/slurm.conf
    slurmctld && slurmd && sinfo        # a moment later: one node, idle
    # stop: kill $(cat $D/run/slurmd.pid $D/run/slurmctld.pid $D/run/munged.pid); rm -rf $D

One node named after ``hostname -s`` with 2 CPUs, reached at 127.0.0.1; no cgroups (process tracking by
/proc, no task binding), no accounting, no GPUs: templates asking for GPUs are submitted with
``--gres=none``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "squeue", "srun")
CPUS = 2
# The daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def slurm_conf(root: Path, node: str, user: str, ctld_port: int, slurmd_port: int) -> str:
    """The whole configuration: one node, everything on loopback and under ``root``."""
    return f"""\
ClusterName=clsptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# slurmd (and srun) bind to the node's address only, not to every interface
CommunicationParameters=NoInAddrAny
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/run/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
# scancel: SIGKILL 5 s after SIGTERM (default 30 s), so teardown is quick
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running cluster: its directory, node name, and the environment its clients need."""

    root: Path
    node: str
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a client command (sinfo, scontrol, scancel, ...) against this cluster."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}\n{self.logs()}")
        return done

    def job_env(self, **extra: str) -> dict[str, str]:
        """An environment to submit jobs with (sbatch passes it on to the job): this cluster's plus ``extra``."""
        return dict(self.env, **extra)

    def logs(self, chars: int = 3000) -> str:
        """The end of each daemon's log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]


def ensure_installed() -> None:
    """Install Slurm and munge through apt when missing; skip the tests where that cannot be done."""
    if not _missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"Slurm could not be installed: {', '.join(_missing())} missing, and installing "
                    f"{' '.join(PACKAGES)} needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0 or _missing():
        pytest.skip(f"Slurm could not be installed (apt-get install {' '.join(PACKAGES)}): "
                    f"{done.stderr.strip()[-500:] or ', '.join(_missing()) + ' still missing'}")


def _wait(what: str, ready: Callable[[], bool], cluster: SlurmCluster, timeout: float = 60) -> None:
    """Poll ``ready``, failing early with the logs when a daemon died."""
    deadline = time.monotonic() + timeout
    while not ready():
        for daemon in cluster.daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{daemon.args[0]} exited ({daemon.returncode}) before {what}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(0.2)


def _start(cluster: SlurmCluster, *cmd: str) -> None:
    """Start a daemon in the foreground of a child process, so teardown can stop exactly it."""
    with open(cluster.root / "log" / f"{Path(cmd[0]).name}.out", "w") as log:
        cluster.daemons.append(subprocess.Popen(cmd, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL))


def _node_state(cluster: SlurmCluster) -> str:
    done = cluster.run("sinfo", "--noheader", "--nodes", cluster.node, "--format", "%T", check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def _jobs(cluster: SlurmCluster) -> list[str]:
    return cluster.run("squeue", "--noheader", "--format", "%i", check=False).stdout.split()


@contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd on a fresh configuration; stop them and delete everything after."""
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="clsp-slurm-"))
    root.chmod(0o755)  # munged refuses a socket in a directory others cannot traverse
    for name in ("munge", "run", "state", "spool", "log"):
        (root / name).mkdir()
    (root / "munge").chmod(0o700)
    (root / "run").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, node, getpass.getuser(), free_port(), free_port()))
    # A test run inside a Slurm job must not hand that job's variables to this cluster's clients.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), PATH=SEARCH_PATH)
    cluster = SlurmCluster(root=root, node=node, env=env)
    sbin = {tool: shutil.which(tool, path=SEARCH_PATH) for tool in ("munged", "slurmctld", "slurmd")}
    try:
        _start(cluster, sbin["munged"], "--foreground", f"--key-file={key}", f"--socket={root}/run/munge.socket",
               f"--pid-file={root}/run/munged.pid", f"--seed-file={root}/munge/munged.seed",
               f"--log-file={root}/log/munged.log")
        _wait("munged's socket", (root / "run" / "munge.socket").exists, cluster)
        _start(cluster, sbin["slurmctld"], "-D", "-f", str(conf))
        _wait("slurmctld", lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, cluster)
        _start(cluster, sbin["slurmd"], "-D", "-f", str(conf))
        _wait(f"node {node} to be idle", lambda: _node_state(cluster) == "idle", cluster)
        yield cluster
    finally:
        if len(cluster.daemons) == 3:  # cancel what is left (a test that timed out) while slurmd can still end it
            cluster.run("scancel", f"--user={getpass.getuser()}", check=False)
            deadline = time.monotonic() + 30
            while _jobs(cluster) and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(cluster.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(root, ignore_errors=True)
