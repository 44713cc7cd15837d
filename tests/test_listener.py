"""The gateway's own accept loop: a burst of new clients is taken in at once, not one per turn
of the event loop (uvloop's own servers do the latter since libuv 1.45)."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from gateway.listener import Listener

WAITING = 200


class Counted(asyncio.Protocol):
    made: list[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


async def turns_to_take_in() -> int:
    """Turns of the loop until `WAITING` connections queued before it looked are served."""
    made: list[asyncio.BaseTransport] = []
    protocol = type("P", (Counted,), {"made": made})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = Listener(sock, protocol, backlog=WAITING * 2)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(WAITING)]
    turns = 0
    while len(made) < WAITING and turns < 10 * WAITING:
        await asyncio.sleep(0)
        turns += 1
    server.close()
    for transport in made:
        transport.close()
    for client in clients:
        client.close()
    await server.wait_closed()
    sock.close()
    assert len(made) == WAITING
    return turns


def test_waiting_connections_are_taken_in_at_once_on_uvloop() -> None:
    # uvloop's own server takes 200 turns for them here (libuv 1.52 in uvloop 0.23)
    assert uvloop.run(turns_to_take_in()) <= 5


async def test_a_closed_listener_takes_in_nobody() -> None:
    made: list[asyncio.BaseTransport] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    listener = Listener(sock, type("P", (Counted,), {"made": made}), backlog=8)
    listener.close()
    client = socket.create_connection(sock.getsockname())  # the kernel still queues it
    for _ in range(20):
        await asyncio.sleep(0)
    await listener.wait_closed()
    assert made == []
    client.close()
    sock.close()
