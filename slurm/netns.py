"""Several "nodes" on one machine: one network namespace per node, joined by a bridge.

    net = Network(nodes=2).create()    # bridge lsNbr 10.213.N.1/24; namespaces lsNn1 (.2), lsNn2 (.3)
    subprocess.run([*net.nodes[0].run, "hostname", "-I"])   # runs inside node 1's namespace
    net.destroy()

Each node's namespace holds a veth end `lsNeK` with its own address and its own loopback; the other
end sits on the bridge in this namespace, which holds the .1 address (where slurmctld listens). A
process started in a namespace reaches the other nodes only through its veth, as on a cluster, while
files (and munge's socket) are shared. N is the first index whose bridge does not exist yet, so
clusters of concurrent test sessions do not meet. Needs root, iproute2 (`ip`) and util-linux
(`nsenter`); a failing `ip` call raises subprocess.CalledProcessError with its stderr.
"""

import os
import signal
import subprocess
from dataclasses import dataclass

SUBNET = "10.213.{index}"  # a private /24 per cluster; .1 is the bridge, .2, .3, ... the nodes


@dataclass
class Node:
    name: str  # namespace name = SLURM node name
    address: str
    interface: str  # the veth end inside the namespace

    @property
    def run(self) -> list[str]:
        """Command prefix that runs a program inside this node's network namespace. Not `ip netns
        exec`, which also remounts /sys: slurmd wants the machine's /sys/fs/cgroup."""
        return ["nsenter", f"--net=/run/netns/{self.name}"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Network:
    def __init__(self, nodes: int):
        self.size = nodes
        self.bridge = self.address = None
        self.nodes: list[Node] = []
        self.created: list[tuple[str, ...]] = []  # `ip` commands that undo what was made, last first

    def create(self) -> "Network":
        for index in range(1, 255):  # the first free name: another session may hold ls1br
            try:
                _ip("link", "add", f"ls{index}br", "type", "bridge")
                break
            except subprocess.CalledProcessError as e:
                if "exists" not in e.stderr:
                    raise
        prefix, subnet = f"ls{index}", SUBNET.format(index=index)
        self.bridge, self.address = f"{prefix}br", f"{subnet}.1"
        self.created.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for k in range(1, self.size + 1):
            node = Node(f"{prefix}n{k}", f"{subnet}.{k + 1}", f"{prefix}e{k}")
            outside = f"{prefix}v{k}"
            _ip("netns", "add", node.name)
            self.created.append(("netns", "del", node.name))
            _ip("link", "add", outside, "type", "veth", "peer", "name", node.interface)
            self.created.append(("link", "del", outside))  # removes both ends
            _ip("link", "set", node.interface, "netns", node.name)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", node.name, "addr", "add", f"{node.address}/24", "dev", node.interface)
            _ip("-n", node.name, "link", "set", node.interface, "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
            self.nodes.append(node)
        return self

    def destroy(self) -> None:
        """Kill what still runs in the nodes' namespaces (a job step SLURM could not end), then remove
        the namespaces and links made, last first; goes on past failures (a link that went away with
        its namespace)."""
        for node in self.nodes:
            pids = subprocess.run(["ip", "netns", "pids", node.name], capture_output=True, text=True).stdout
            for pid in map(int, pids.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for args in reversed(self.created):
            subprocess.run(["ip", *args], capture_output=True)
        self.created, self.nodes = [], []
