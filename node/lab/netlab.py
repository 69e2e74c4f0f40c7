"""A network-namespace lab: separate "hosts" with their own IPs on one bridge (root only).

Layout (prefix `swl`, subnet 10.77.0.0/24 by default):

    root ns: swl-obs 10.77.0.254 ──veth── [ns swl-hub: bridge swlbr] ──veth── ns swl-<name>: eth0 10.77.0.<k>

Each host is a namespace whose `eth0` is a veth end; the other end is a bridge port in the hub
namespace. The root namespace's observer address (.254) reads every node's /status and /metrics;
partitions and loss always spare it. Impairments live in the host's own namespace: partition
(nftables `inet swlab_part`, dropping input and output), loss P % (`inet swlab_loss`, `numgen
random mod 100 < P drop` on input), shape RATE (`tbf` on eth0 egress), delay (netem, probed
once; where the kernel lacks it, `delay` reports why it cannot run).
Invariants: only namespaces and links with the lab prefix are created or deleted; `down()` is
idempotent, never raises, and is what `__exit__` calls; `up()` first removes a stale lab of the
same prefix left by a crashed run.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass


class LabError(RuntimeError):
    pass


def _run(cmd: list[str], *, check: bool = True, stdin: str | None = None, timeout_s: float = 15.0
         ) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout_s)
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


def capability() -> tuple[bool, str]:
    """(True, "") when this process can build a lab: root, `ip netns`, `nft` and `tc` present."""
    if os.geteuid() != 0:
        return False, "the network-namespace lab needs root (running as uid %d)" % os.geteuid()
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found (apt-get install nftables iproute2)"
    probe = "swl-probe-%d-%d" % (os.getpid(), threading.get_ident() % 1000000)  # labs may start side by side
    r = _run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return False, f"`ip netns add` does not work here: {r.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return True, ""


def lab_namespaces(prefix: str = "swl") -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix + "-"))


def cleanup(prefix: str = "swl") -> list[str]:
    """Delete every namespace and root-namespace link of this lab prefix; returns what it removed.
    Deleting a namespace deletes the veths in it, and with them their peers."""
    removed = []
    for ns in lab_namespaces(prefix):
        _run(["ip", "netns", "pids", ns], check=False)
        if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(ns)
    if _run(["ip", "link", "show", f"{prefix}-obs"], check=False).returncode == 0:
        _run(["ip", "link", "del", f"{prefix}-obs"], check=False)
        removed.append(f"{prefix}-obs")
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip: str
    hub_port: str  # the bridge-side veth, inside the hub namespace

    def prefix(self) -> list[str]:
        """Prepend to a command to run it inside this host."""
        return ["ip", "netns", "exec", self.ns]


class NetLab:
    def __init__(self, prefix: str = "swl", subnet: str = "10.77.0.0/24"):
        self.prefix = prefix
        self.net = ipaddress.ip_network(subnet)
        hosts = list(self.net.hosts())
        self.observer_ip = str(hosts[-1])
        self._free_ips = [str(ip) for ip in hosts[:-1]]
        self.hub = f"{prefix}-hub"
        self.hosts: dict[str, Host] = {}
        self._netem: tuple[bool, str] | None = None
        self._is_up = False

    # ---- lifecycle ---------------------------------------------------------------------
    def up(self) -> "NetLab":
        ok, why = capability()
        if not ok:
            raise LabError(why)
        stale = cleanup(self.prefix)
        if stale:
            print(f"[netlab] removed a stale lab from an earlier run: {', '.join(stale)}", flush=True)
        self._check_subnet_free()
        self._is_up = True  # from here on, down() has something to undo
        _run(["ip", "netns", "add", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.hub, "link", "add", "swlbr", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "swlbr", "up"])
        obs = f"{self.prefix}-obs"
        _run(["ip", "link", "add", obs, "type", "veth", "peer", "name", "obs", "netns", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", "obs", "master", "swlbr", "up"])
        _run(["ip", "addr", "add", f"{self.observer_ip}/{self.net.prefixlen}", "dev", obs])
        _run(["ip", "link", "set", obs, "up"])
        return self

    def _check_subnet_free(self) -> None:
        r = _run(["ip", "-4", "route", "show"], check=False)
        for line in r.stdout.splitlines():
            dest = line.split()[0]
            if dest == "default":
                continue
            try:
                if ipaddress.ip_network(dest, strict=False).overlaps(self.net):
                    raise LabError(f"the lab subnet {self.net} overlaps an existing route: {line.strip()}")
            except ValueError:
                continue

    def down(self) -> None:
        if not self._is_up:
            return
        try:
            cleanup(self.prefix)
        finally:
            self._is_up = False
            self.hosts.clear()

    def __enter__(self) -> "NetLab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ---- hosts -------------------------------------------------------------------------
    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            return self.hosts[name]
        if not self._free_ips:
            raise LabError(f"no free address left in {self.net}")
        ip = self._free_ips.pop(0)
        host = Host(name, f"{self.prefix}-{name}", ip, f"p{len(self.hosts)}")
        _run(["ip", "netns", "add", host.ns])
        self.hosts[name] = host
        _run(["ip", "-n", self.hub, "link", "add", host.hub_port, "type", "veth", "peer", "name", "eth0",
              "netns", host.ns])
        _run(["ip", "-n", self.hub, "link", "set", host.hub_port, "master", "swlbr", "up"])
        _run(["ip", "-n", host.ns, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0"])
        _run(["ip", "-n", host.ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", host.ns, "link", "set", "lo", "up"])
        return host

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no lab host named {name!r}") from None

    def exec(self, name: str, cmd: list[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        return _run([*self.host(name).prefix(), *cmd], check=False, timeout_s=timeout_s)

    # ---- impairments -------------------------------------------------------------------
    def partition(self, name: str) -> None:
        h, obs = self.host(name), self.observer_ip
        self._nft(h, "swlab_part", f"""
            chain input {{ type filter hook input priority -10; policy drop;
                iif "lo" accept; ip saddr {obs} accept; }}
            chain output {{ type filter hook output priority -10; policy drop;
                oif "lo" accept; ip daddr {obs} accept; }}""")

    def heal(self, name: str) -> None:
        self._nft_delete(self.host(name), "swlab_part")

    def loss(self, name: str, percent: int) -> None:
        h = self.host(name)
        if percent <= 0:
            self._nft_delete(h, "swlab_loss")
            return
        self._nft(h, "swlab_loss", f"""
            chain input {{ type filter hook input priority -5; policy accept;
                iif "lo" accept; ip saddr {self.observer_ip} accept;
                {"drop" if percent >= 100 else f"numgen random mod 100 < {int(percent)} drop"}; }}""")

    def shape(self, name: str, rate: str) -> None:
        h = self.host(name)
        if rate == "off":
            _run([*h.prefix(), "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
            return
        _run([*h.prefix(), "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
              "burst", "32kbit", "latency", "50ms"])

    def netem_available(self) -> tuple[bool, str]:
        """Probe netem once, on a throwaway veth pair inside the hub namespace (veth, unlike
        dummy, exists on every kernel the lab runs on)."""
        if self._netem is None:
            _run(["ip", "-n", self.hub, "link", "add", "nmprobe", "type", "veth", "peer", "name", "nmprobe2"])
            r = _run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "add", "dev", "nmprobe", "root", "netem",
                      "delay", "1ms"], check=False)
            _run(["ip", "-n", self.hub, "link", "del", "nmprobe"], check=False)
            self._netem = (True, "") if r.returncode == 0 else (
                False, f"netem is not available on this kernel (`tc qdisc add ... netem` failed: "
                       f"{(r.stderr or r.stdout).strip()})")
        return self._netem

    def delay(self, name: str, delay: str) -> None:
        ok, why = self.netem_available()
        if not ok:
            raise LabError(why)
        h = self.host(name)
        if delay == "off":
            _run([*h.prefix(), "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
            return
        _run([*h.prefix(), "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", delay])

    def _nft(self, h: Host, table: str, body: str) -> None:
        self._nft_delete(h, table)  # replace, never stack two copies
        _run([*h.prefix(), "nft", "-f", "-"], stdin=f"table inet {table} {{{body}\n}}\n")

    @staticmethod
    def _nft_delete(h: Host, table: str) -> None:
        _run([*h.prefix(), "nft", "delete", "table", "inet", table], check=False)
