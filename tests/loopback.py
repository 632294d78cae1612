"""What the tests' servers listen on: the TCP listening sockets of given processes, read from /proc,
so a test can check that Ray, torchrun and PostgreSQL stay on loopback addresses."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    # the kernel prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening(pids) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of pids holds open."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                ip, port = local.split(":")
                found.add((_address(ip), int(port, 16)))
    return found


def children(pid: int) -> list[int]:
    """pid and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = (task / "children")
            if kids.exists():
                todo += [int(k) for k in kids.read_text().split()]
    return out


def only_loopback(addresses: set[tuple[str, int]]) -> bool:
    """Whether every address is a loopback one (::ffff:127.0.0.1, IPv4 on an IPv6 socket, included)."""
    ips = [ipaddress.ip_address(a) for a, _ in addresses]
    return all((getattr(ip, "ipv4_mapped", None) or ip).is_loopback for ip in ips)
