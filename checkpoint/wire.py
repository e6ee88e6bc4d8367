"""Messages between trainers and keepers, and between keepers: a JSON header, bytes, file descriptors.

Frame: header length (4 bytes) | payload length (8 bytes) | JSON header | payload. File
descriptors (shared-memory slots handed from a keeper to its trainers) ride along the frame's
first bytes on Unix sockets (SCM_RIGHTS).
"""

import json
import os
import socket
import struct
from typing import Any

from .erasure import Block

_PREFIX = struct.Struct(">IQ")
_MAX_FDS = 256
_CHUNK = 16 << 20


class PeerGone(ConnectionError):
    """The other end closed the connection or sent a malformed frame."""


def send(sock: socket.socket, header: dict[str, Any], payload: Block = b"", fds: list[int] = ()) -> None:
    """Send one frame; ``fds`` only over a Unix socket."""
    encoded = json.dumps(header).encode()
    view = memoryview(payload).cast("B")
    first = _PREFIX.pack(len(encoded), len(view)) + encoded
    if fds:
        socket.send_fds(sock, [first], list(fds))
    else:
        sock.sendall(first)
    for start in range(0, len(view), _CHUNK):
        sock.sendall(view[start : start + _CHUNK])


def receive(sock: socket.socket) -> tuple[dict[str, Any], bytearray, list[int]]:
    """Receive one frame: (header, payload, file descriptors). PeerGone at end of stream."""
    fds: list[int] = []
    if sock.family == socket.AF_UNIX:
        first, fds, _, _ = socket.recv_fds(sock, _PREFIX.size, _MAX_FDS)
    else:
        first = sock.recv(_PREFIX.size)
    if not first:
        raise PeerGone("connection closed")
    prefix = first + _receive_exactly(sock, _PREFIX.size - len(first))
    header_length, payload_length = _PREFIX.unpack(prefix)
    try:
        header = json.loads(_receive_exactly(sock, header_length))
    except ValueError as error:
        raise PeerGone(f"malformed frame header ({error})") from error
    payload = _receive_exactly(sock, payload_length)
    return header, payload, list(fds)


def request(sock: socket.socket, header: dict[str, Any], payload: Block = b"") -> tuple[dict, bytearray, list[int]]:
    """Send a frame and wait for the answer; an answer with an ``error`` raises RuntimeError."""
    send(sock, header, payload)
    reply, data, fds = receive(sock)
    if reply.get("error"):
        for fd in fds:
            os.close(fd)
        raise RuntimeError(reply["error"])
    return reply, data, fds


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive_exactly(sock: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)
    view = memoryview(buffer)
    received = 0
    while received < length:
        count = sock.recv_into(view[received:], min(length - received, _CHUNK))
        if count == 0:
            raise PeerGone(f"connection closed after {received} of {length} bytes")
        received += count
    return buffer

