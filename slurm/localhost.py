"""A real single-node SLURM cluster on this machine, for tests: install, configure, start, stop.

    with LocalSlurm(folder, cpus=2) as cluster:   # SLURM_CONF points at it, here and in children
        job = submit(...)                          # sbatch, srun, scontrol work as on a cluster
        info = cluster.wait(job)                   # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

Debian packages (slurm-wlm slurmctld slurmd slurm-client munge) are installed with apt-get when a
binary is missing; `Unavailable` says why when that cannot work (not root, no apt-get). Everything
else lives under `folder`: slurm.conf, state, spool, pid and log files. The daemons run in the
foreground as children of this process (no systemd); munged is started only when no munged answers,
and whatever was started is stopped again. Settings that make this work without cgroups or systemd,
and that make a requeued job start in seconds (see ../shared/notes/slurm-localhost.md):
proctrack/linuxproc, task/none, no accounting, AuthInfo=cred_expire=10, sched_interval=5, and
`wait` moving a requeued job's BeginTime to now.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "munge", "unmunge"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}

SLURM_CONF = """\
ClusterName=localhost
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
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
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=local Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Unavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


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
    def __init__(self, folder, cpus: int = None):
        self.folder = Path(folder).resolve()
        self.cpus = cpus or os.cpu_count()
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self.munged = None
        self.hosts_line = None
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
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF.format(host=self.host, folder=self.folder, cpus=self.cpus,
                                               ctld_port=_free_port(), slurmd_port=_free_port()))
        self.saved_env = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        for daemon in ("slurmctld", "slurmd"):
            with open(self.folder / f"{daemon}.stderr", "w") as log:
                self.daemons.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=log,
                                                     stderr=subprocess.STDOUT))
        _wait_until(self._idle, 30, f"the node to be idle (logs in {self.folder})")

    def _idle(self) -> bool:
        for d in self.daemons:
            if d.poll() is not None:
                log = (self.folder / f"{d.args[0]}.log")
                tail = log.read_text()[-1500:] if log.exists() else ""
                raise Unavailable(f"{d.args[0]} exited with {d.returncode}:\n{tail}")
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
            self.hosts_line = f"127.0.0.1 {self.host}  # slurm.localhost\n"
            with open("/etc/hosts", "a") as f:
                f.write(self.hosts_line)

    def stop(self) -> None:
        """Cancel every job, stop the daemons (and munged, /etc/hosts line) this object started."""
        if self.daemons and all(d.poll() is None for d in self.daemons):
            subprocess.run(["scancel", "--full", *self.jobs()], capture_output=True)
            try:
                _wait_until(lambda: not self.jobs(), 30, "jobs to end")
            except Unavailable:
                pass
        for d in reversed(self.daemons):
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(15)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
        self.daemons = []
        if self.munged is not None:
            os.kill(self.munged, 15)
            self.munged = None
        if self.hosts_line is not None:
            hosts = Path("/etc/hosts")
            hosts.write_text(hosts.read_text().replace(self.hosts_line, ""))
            self.hosts_line = None
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

    def wait(self, job_id: str, timeout: float = 300) -> dict:
        """Poll a job until it has finished; a requeued job is started at once rather than after its
        credential expires (BeginTime). Returns the job's final `scontrol show job` fields."""
        def finished():
            info = self.job(job_id)
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                               capture_output=True)
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
