"""The launcher srun starts on every node: torchrun, told which node hosts the rendezvous and which
network interface reaches the other nodes, with the trainer's "preempted" exit code kept.

    python -m slurm.launch [torchrun options] -m trainer RECIPE --stage S [key=value ...]

Across nodes. train.sbatch passes `--rdzv-endpoint=HEAD:PORT`, HEAD being the first node of
$SLURM_JOB_NODELIST. The node whose $SLURMD_NODENAME is HEAD hosts the c10d store (`is_host` in
--rdzv-conf; torchrun's own guess compares HEAD with the machine's hostname and its addresses, which
need not match a SLURM node name). Every node finds the interface its kernel routes HEAD's address
through (the head node: the next node's address) and sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME
to it, each only when unset, and torchrun's --local-addr to its address (the workers' store is on
rank 0's node, which need not be HEAD). Otherwise gloo binds to the address the
hostname resolves to (often 127.0.1.1 or a management network), NCCL to the first interface it
likes, and rank 0 advertises its FQDN, which may resolve to loopback or another network.

Exit codes. torchrun reports any failed worker as exit code 1, but the batch script must know that
the ranks saved a checkpoint and left with EXIT_PREEMPTED (75) to requeue the job. So the launcher
counts as preempted when every failed worker exited 75, or when torchrun was itself stopped by
SIGUSR1, which it forwarded to the workers (the batch script passes --signals-to-handle with SIGUSR1:
the trainer checkpoints on it, and torchrun waits --shutdown-timeout seconds). Preempted, it exits 75,
or, under train.sbatch ($PREEMPTION_MARKER set), creates that file and exits 0: srun's
--kill-on-bad-exit would answer the first node's 75 by killing the launchers of the nodes whose ranks
are still leaving, and srun's exit code would then be theirs. Stopped by any other signal (srun's
SIGTERM after a rank on another node failed), it exits 128 + the signal: a failure, not a preemption,
so the job is not requeued. Anything else is torchrun's own.
"""

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from . import EXIT_PREEMPTED

SOCKET_IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address


def interface_address(name: str) -> Optional[str]:
    """The IPv4 address of interface `name`; None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def interface_towards(host: str) -> Optional[str]:
    """The interface this machine sends from to reach `host` (a name or an IPv4 address): the one
    holding the source address of the kernel's route to it. None when it cannot tell (no such host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(host), 9))  # a UDP connect sends nothing; it picks the route
        except OSError:
            return None
        source = s.getsockname()[0]
    return next((name for _, name in socket.if_nameindex() if interface_address(name) == source), None)


def peer_of(node: str, head: str, environ=os.environ) -> str:
    """The node whose route gives `node` its interface: the head node, or, on the head node, the next
    node of the job (its own name may resolve to a loopback address, as Debian's /etc/hosts does)."""
    if node != head or not environ.get("SLURM_JOB_NODELIST"):
        return head
    proc = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
                          capture_output=True, text=True)
    return next((other for other in proc.stdout.split() if other != node), head)


def prepare(args, environ=os.environ) -> list[str]:
    """For a c10d rendezvous under SLURM, fill in torchrun's parsed options `args` (is_host, local_addr)
    and `environ` (the socket interfaces, each only when unset); returns what was decided, for the log."""
    node = environ.get("SLURMD_NODENAME")
    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint or not node:
        return []
    head = args.rdzv_endpoint.rsplit(":", 1)[0]
    decided = [f"node {node}", f"rendezvous {args.rdzv_endpoint}"]
    if "is_host=" not in args.rdzv_conf:
        is_host = "1" if head == node else "0"
        args.rdzv_conf = ",".join(filter(None, [args.rdzv_conf, f"is_host={is_host}"]))
        decided.append(f"is_host={is_host}")
    interface = interface_towards(peer_of(node, head, environ))
    if interface and not args.local_addr:  # rank 0's address for the workers' store (else its FQDN)
        args.local_addr = interface_address(interface)
        decided.append(f"local_addr={args.local_addr}")
    for key in SOCKET_IFNAME_VARIABLES:
        if environ.get(key):
            decided.append(f"{key}={environ[key]} (given)")
        elif interface:
            environ[key] = interface
            decided.append(f"{key}={interface}")
    return decided


def main(argv=None) -> int:
    args = parse_args(argv)
    decided = prepare(args)
    if decided:
        print(f"[slurm.launch] {', '.join(decided)}", file=sys.stderr, flush=True)
    try:
        run(args)
    except ChildFailedError as e:
        if all(f.exitcode == EXIT_PREEMPTED for f in e.failures.values()):
            return preempted()
        raise
    except SignalException as e:
        if e.sigval == signal.SIGUSR1:
            print(f"[slurm.launch] {e}; the workers were told to checkpoint", file=sys.stderr, flush=True)
            return preempted()
        print(f"[slurm.launch] {e}: stopped", file=sys.stderr, flush=True)
        return 128 + e.sigval
    return 0


def preempted() -> int:
    """EXIT_PREEMPTED, or under train.sbatch: create $PREEMPTION_MARKER and exit 0."""
    marker = os.environ.get("PREEMPTION_MARKER")
    if not marker:
        return EXIT_PREEMPTED
    Path(marker).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
