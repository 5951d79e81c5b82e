"""A real SLURM cluster on this machine, for tests: install, configure, start, stop.

    with LocalSlurm(folder, cpus=2) as cluster:   # SLURM_CONF points at it, here and in children
        job = submit(...)                          # sbatch, srun, scontrol work as on a cluster
        info = cluster.wait(job)                   # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    with LocalSlurm(folder, cpus=2, nodes=2):      # two nodes, each in its own network namespace

Debian packages (slurm-wlm slurmctld slurmd slurm-client munge) are installed with apt-get when a
binary is missing; `Unavailable` says why when that cannot work (not root, no apt-get, no network
namespaces). Everything else lives under `folder`: slurm.conf, state, spool, pid and log files. The
daemons run in the foreground as children of this process (no systemd); munged is started only when
no munged answers, and whatever was started is stopped again. Settings that make this work without
cgroups or systemd, and that make a requeued job start in seconds (see
../shared/notes/slurm-localhost.md): proctrack/linuxproc, task/none, no accounting,
AuthInfo=cred_expire=10, sched_interval=5, and `wait` moving a requeued job's BeginTime to 2 s
after the requeue.

One node is this machine's hostname at 127.0.0.1. With nodes > 1 each node is a network namespace
on a bridge (slurm/netns.py) whose name is in /etc/hosts for the cluster's lifetime: one slurmd per
namespace (`slurmd -N NODE`), slurmctld on the bridge address, one munged for all (its socket is a
file). A job's tasks inherit their slurmd's namespace, so ranks on different nodes talk over the
veth links, through the interfaces and addresses a real cluster would make them choose.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .netns import Network

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "munge", "unmunge"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
ClusterName=localhost
SlurmctldHost={host}({ctld_address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=5
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=3600
{node_lines}
PartitionName=local Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class Unavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


class NoNamespaces(Unavailable):
    """Several nodes need network namespaces, which this machine does not give (not root, no iproute2)."""


def install() -> None:
    """apt-get install the SLURM and munge packages, only when one of their binaries is missing."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root (apt-get)")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # stale or missing package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise Unavailable(f"`{' '.join(cmd)}` did not install {missing} (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(check, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise Unavailable(f"timed out after {timeout:.0f} s waiting for {what}")


def _munge_answers() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


class LocalSlurm:
    """A cluster of `nodes` nodes with `cpus` CPUs each (slurm.conf may claim more CPUs than exist)."""

    def __init__(self, folder, cpus: int = None, nodes: int = 1):
        self.folder = Path(folder).resolve()
        self.cpus = cpus or os.cpu_count()
        self.nodes = nodes
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.daemons: list[tuple[str, subprocess.Popen]] = []  # (log file stem, process)
        self.network = None
        self.munged = None
        self.hosts_lines = ""
        self.saved_env = None

    # ------------------------------------------------------------ start / stop

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        install()
        self._start_munge()
        self._resolve_hostname()
        if self.nodes > 1:
            self._start_network()
            nodes = [(node.name, node.address) for node in self.network.nodes]
            ctld_address = self.network.address
        else:
            nodes, ctld_address = [(self.host, "127.0.0.1")], "127.0.0.1"
        for sub in ["state", *(f"spool/{name}" for name, _ in nodes)]:
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        node_lines = "\n".join(f"NodeName={name} NodeAddr={address} CPUs={self.cpus} State=UNKNOWN"
                               for name, address in nodes)
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, ctld_address=ctld_address, folder=self.folder, node_lines=node_lines,
            node_names=",".join(name for name, _ in nodes), ctld_port=_free_port(), slurmd_port=_free_port()))
        self.saved_env = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        if self.network is None:
            self._spawn(f"slurmd-{self.host}", ["slurmd", "-D", "-f", str(self.conf)])
        else:
            for node in self.network.nodes:
                self._spawn(f"slurmd-{node.name}",
                            [*node.run, "slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
        _wait_until(self._idle, 30, f"every node to be idle (logs in {self.folder})")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.folder / f"{name}.stderr", "w") as log:
            self.daemons.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))

    def _start_network(self) -> None:
        """The bridge and one namespace per node, their names in /etc/hosts."""
        missing = [tool for tool in ("ip", "nsenter") if not shutil.which(tool)]
        if missing:
            raise NoNamespaces(f"network namespaces need {missing} (iproute2, util-linux): not installed")
        self.network = Network(self.nodes)
        try:
            self.network.create()
        except subprocess.CalledProcessError as e:
            raise NoNamespaces(f"cannot create network namespaces ({' '.join(e.cmd)}): {e.stderr.strip()}")
        self._add_hosts("".join(f"{node.address} {node.name}  # slurm.localhost\n"
                                for node in self.network.nodes))

    def _idle(self) -> bool:
        for name, d in self.daemons:
            if d.poll() is not None:
                log = self.folder / f"{name}.log"
                tail = log.read_text()[-1500:] if log.exists() else ""
                stderr = (self.folder / f"{name}.stderr").read_text()[-500:]
                raise Unavailable(f"{name} exited with {d.returncode}:\n{tail}{stderr}")
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        return proc.stdout.strip() == "idle"

    def _start_munge(self) -> None:
        if _munge_answers():
            return  # a munged is already serving
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"],
                       check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        _wait_until(_munge_answers, 10, "munged")
        self.munged = int(Path("/run/munge/munged.pid").read_text())

    def _resolve_hostname(self) -> None:
        try:
            socket.gethostbyname(self.host)
        except OSError:
            self._add_hosts(f"127.0.0.1 {self.host}  # slurm.localhost\n")

    def _add_hosts(self, lines: str) -> None:
        with open("/etc/hosts", "a") as f:
            f.write(lines)
        self.hosts_lines += lines

    def stop(self) -> None:
        """Cancel every job, stop the daemons; remove the namespaces, the /etc/hosts lines and munged
        that this object made."""
        if self.daemons and all(d.poll() is None for _, d in self.daemons):
            subprocess.run(["scancel", "--full", *self.jobs()], capture_output=True)
            try:
                _wait_until(lambda: not self.jobs(), 30, "jobs to end")
            except Unavailable:
                pass
        for _, d in reversed(self.daemons):
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(15)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
        self.daemons = []
        if self.network is not None:
            self.network.destroy()
            self.network = None
        if self.munged is not None:
            os.kill(self.munged, 15)
            self.munged = None
        if self.hosts_lines:
            hosts = Path("/etc/hosts")
            hosts.write_text("".join(line for line in hosts.read_text().splitlines(keepends=True)
                                     if line not in self.hosts_lines.splitlines(keepends=True)))
            self.hosts_lines = ""
        if os.environ.get("SLURM_CONF") == str(self.conf):
            if self.saved_env is not None:
                os.environ["SLURM_CONF"] = self.saved_env
            else:
                os.environ.pop("SLURM_CONF", None)

    # ------------------------------------------------------------ jobs

    def jobs(self) -> list[str]:
        """Ids of the jobs not yet finished (pending, running, completing)."""
        proc = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
        return proc.stdout.split()

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StartTime, EndTime, Reason, ...)."""
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                              text=True, check=True)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def hurry(self, info: dict) -> None:
        """Start a requeued job (`info`: its `job` fields) now rather than when its old credential
        expires (BeginTime). Not at once: slurmd refuses a credential made in the second its job's
        old one was revoked ("Job credential revoked", and the job fails)."""
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={info['JobId']}", "StartTime=now"],
                           capture_output=True)

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        """Poll a job until it has finished; a requeued job is started 2 s after the requeue rather
        than after its credential expires (BeginTime). Returns the job's final `scontrol show job`
        fields."""
        def finished():
            info = self.job(job_id)
            self.hurry(info)
            if info["JobState"] not in FINISHED:
                return None
            # a job that requeues itself can show a finished state for a moment before it is PENDING
            # again: final only if it still is a few seconds later
            time.sleep(5)
            again = self.job(job_id)
            return again if again["JobState"] in FINISHED else None
        try:
            return _wait_until(finished, timeout, f"job {job_id}", poll=0.5)
        except Unavailable as e:
            raise TimeoutError(f"{e}: {self.job(job_id)}") from None
