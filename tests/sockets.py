"""What a process tree listens on, read from /proc (Linux): for the loopback tests."""

from __future__ import annotations

import ipaddress
import os
import socket


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        x = todo.pop()
        out.append(x)
        todo += kids.get(x, [])
    return out


def _listening() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket of this machine."""
    res = {}
    for fam, path in ((socket.AF_INET, "/proc/net/tcp"), (socket.AF_INET6, "/proc/net/tcp6")):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            res[f[9]] = (socket.inet_ntop(fam, raw), int(hexport, 16))
    return res


def listening(root: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of ``root``'s process tree."""
    lst, out = _listening(), set()
    for pid in tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            name = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in lst:
                out.add((name, *lst[link[8:-1]]))
    return out


def is_loopback(ip: str) -> bool:
    """Loopback, IPv4-mapped loopback (``::ffff:127.0.0.1``: gRPC binds IPv4 addresses on
    dual-stack IPv6 sockets) included."""
    a = ipaddress.ip_address(ip)
    mapped = getattr(a, "ipv4_mapped", None)
    return a.is_loopback or (mapped is not None and mapped.is_loopback)


def network_address() -> str | None:
    """This machine's address on its network (the route out), or None without one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the route
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ipaddress.ip_address(ip).is_loopback else ip


def reachable(ip: str, port: int) -> bool:
    """Whether a TCP connection to ``ip:port`` is accepted."""
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False
