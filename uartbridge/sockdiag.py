"""Who is at the other end of a TCP connection from this host: one netlink ``sock_diag`` query.

TCP carries no credentials, but a peer on this host owns a socket the kernel knows. We ask the
kernel for that one socket by its exact 4-tuple (``NETLINK_SOCK_DIAG``,
``SOCK_DIAG_BY_FAMILY`` with an ``inet_diag_req_v2``; linux/inet_diag.h) and get its state,
owner uid and inode: O(1), however many sockets the host has (``/proc/net/tcp`` is a table
scan any user can grow, and a closed socket's row there shows uid 0 — reference/field.md).

The verdict is positive only for a peer socket that is **ESTABLISHED and has a non-zero
inode**. Why both:

* An exact lookup ignores ``idiag_states`` and falls back to a *listener* on the peer's port
  (measured: it returns a LISTEN socket owned by whoever listens there), so the state must be
  checked in the reply.
* A socket its owner has closed is FIN_WAIT1/FIN_WAIT2/TIME_WAIT (its data may still be in
  flight to us), and an orphaned socket reports uid 0 and inode 0. The kernel fills uid
  before inode (``inet_diag_msg_attrs_fill``), and a socket is orphaned only once, so a
  non-zero inode proves the uid was read from a socket that still had its owner.
* CLOSE_WAIT (the peer received our FIN) cannot be the peer's state before we closed; it is
  refused like every state but ESTABLISHED.

A peer the kernel does not know is either on another host or a local socket that is already
gone; ``is_local_address`` tells them apart (a bind test: only this host's addresses bind).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from .errors import BusError
from .sockets import PeerCredentials

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>, <net/tcp_states.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLMSG_ERROR = 0x02
TCP_ESTABLISHED = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_SOCKID_PORTS = struct.Struct(">HH")  # sport, dport: network order
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
_SOCKID_SIZE = 48
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_ERRNO = struct.Struct("=i")

TCP_STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}


@dataclass(frozen=True, slots=True)
class DiagSocket:
    """What the kernel says about one TCP socket."""

    state: int
    uid: int
    inode: int

    @property
    def state_name(self) -> str:
        return TCP_STATE_NAMES.get(self.state, str(self.state))


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpPeer:
    """The verdict on a TCP peer: ``creds`` when it is positively identified, else why not.

    ``local`` is False only for a peer address that is not this host's (a remote peer).
    """

    creds: PeerCredentials | None
    local: bool
    reason: str = ""


class SockDiag:
    """One netlink ``sock_diag`` socket, for exact-match queries (no dumps).

    The kernel answers an exact query inside ``send`` (netlink requests to the kernel are
    handled in the sender's context), so ``recv`` never waits; a missing answer is an error.
    """

    def __init__(self) -> None:
        """Open the netlink socket; ``BusError`` if the kernel or a sandbox refuses it."""
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self._sock.bind((0, 0))
        except OSError as exc:
            raise BusError(
                f"cannot open a netlink sock_diag socket ({exc.strerror or exc}); TCP peers "
                "cannot be identified (a systemd unit needs AF_NETLINK in "
                "RestrictAddressFamilies=)"
            ) from exc
        self._seq = itertools.count(1)
        self.queries = 0  # how many lookups were made (each one send + one recv)

    def close(self) -> None:
        """Close the netlink socket."""
        self._sock.close()

    def lookup(
        self, family: int, src: tuple[str, int], dst: tuple[str, int]
    ) -> DiagSocket | None:
        """The TCP socket whose local end is ``src`` and remote end ``dst``, or None.

        ``family`` is ``AF_INET`` or ``AF_INET6`` and the addresses are of that family.
        """
        seq = next(self._seq) & 0xFFFFFFFF
        request = (
            _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED)
            + _SOCKID_PORTS.pack(src[1], dst[1])
            + _packed(family, src[0])
            + _packed(family, dst[0])
            + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        )
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST, seq, 0)
        self.queries += 1
        try:
            self._sock.send(header + request)
            while True:
                data = self._sock.recv(8192, socket.MSG_DONTWAIT)
                if len(data) < _NLMSGHDR.size:
                    raise BusError("sock_diag: short netlink reply")
                _length, kind, _flags, reply_seq, _pid = _NLMSGHDR.unpack_from(data)
                if reply_seq == seq:
                    break  # an older reply (none is expected) is skipped
        except BlockingIOError as exc:
            raise BusError("sock_diag: the kernel did not answer") from exc
        except OSError as exc:
            raise BusError(f"sock_diag query failed: {exc.strerror or exc}") from exc
        body = _NLMSGHDR.size
        if kind == NLMSG_ERROR:
            (error,) = _ERRNO.unpack_from(data, body)
            if error == -2:  # ENOENT: no such socket
                return None
            raise BusError(f"sock_diag query refused: {os.strerror(-error)}")
        if len(data) < body + _MSG_HEAD.size + _SOCKID_SIZE + _MSG_TAIL.size:
            raise BusError("sock_diag: short inet_diag_msg")
        _family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, body)
        _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(
            data, body + _MSG_HEAD.size + _SOCKID_SIZE
        )
        return DiagSocket(state=state, uid=uid, inode=inode)


def _packed(family: int, ip: str) -> bytes:
    return socket.inet_pton(family, ip).ljust(16, b"\0")


def _plain_ip(ip: str) -> str:
    """``::ffff:a.b.c.d`` as ``a.b.c.d``; anything else unchanged (a zone index dropped)."""
    ip = ip.split("%", 1)[0]
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def is_local_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (in this network namespace).

    Only a local address can be bound without ``IP_FREEBIND``. Where the host allows binding
    any address (``net.ipv4.ip_nonlocal_bind``) every address looks local: remote peers are
    then refused, never admitted by mistake.
    """
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        return True
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as probe:
        try:
            probe.bind((str(addr), 0))
        except OSError:
            return False
    return True


def identify_tcp_peer(sock: socket.socket, diag: SockDiag) -> TcpPeer:
    """Who owns the peer end of the connected TCP socket ``sock``, as the kernel says.

    ``creds`` is set only for a peer socket on this host that is ESTABLISHED with an inode;
    the gid and groups are the user database's for its uid (``pid`` is 0: unknown).
    """
    try:
        peer_ip, peer_port = sock.getpeername()[:2]
        own_ip, own_port = sock.getsockname()[:2]
    except OSError as exc:
        return TcpPeer(creds=None, local=True, reason=f"gone before it was identified ({exc})")
    peer = _plain_ip(peer_ip)
    own = _plain_ip(own_ip)
    family = socket.AF_INET if ipaddress.ip_address(peer).version == 4 else socket.AF_INET6
    try:
        # An AF_INET query also finds an AF_INET6 socket with v4-mapped addresses (measured).
        found = diag.lookup(family, (peer, peer_port), (own, own_port))
    except BusError as exc:
        return TcpPeer(creds=None, local=True, reason=str(exc))
    if found is None:
        if is_local_address(peer):
            return TcpPeer(creds=None, local=True, reason="peer socket not found (closed)")
        return TcpPeer(creds=None, local=False, reason=f"{peer} is not an address of this host")
    if found.state != TCP_ESTABLISHED or found.inode == 0:
        return TcpPeer(
            creds=None,
            local=True,
            reason=f"peer socket is {found.state_name} (inode {found.inode}), not an "
            "ESTABLISHED socket with an owner",
        )
    return TcpPeer(creds=credentials_of_uid(found.uid), local=True)


def credentials_of_uid(uid: int) -> PeerCredentials:
    """``PeerCredentials`` for ``uid`` with the user database's gid and groups (pid 0)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return PeerCredentials(pid=0, uid=uid, gid=-1)
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return PeerCredentials(pid=0, uid=uid, gid=entry.pw_gid, groups=groups)


__all__ = [
    "DiagSocket",
    "SockDiag",
    "TcpPeer",
    "credentials_of_uid",
    "identify_tcp_peer",
    "is_local_address",
]
