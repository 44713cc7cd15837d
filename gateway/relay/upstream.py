"""The pooled HTTP clients of each backend, with the backend's explicit timeouts: the relay's own
client (gateway/relay/client.py) for the calls relayed, an aiohttp session for the drivers'.

aiohttp rather than httpx for the drivers: measured on this hardware, httpx's pool caps a relay
at ~2 % of a direct connection's throughput, aiohttp's client reaches over 20 %
(bench/overhead.py).
"""

from __future__ import annotations

import aiohttp

from gateway.config.schema import BackendConfig
from gateway.relay.client import Client


def client_timeout(backend: BackendConfig) -> aiohttp.ClientTimeout:
    t = backend.timeouts
    # aiohttp's `connect` covers waiting for a pooled connection plus opening one.
    return aiohttp.ClientTimeout(total=None, connect=t.pool + t.connect, sock_connect=t.connect,
                                 sock_read=t.read)


class Upstreams:
    """Lazily created clients, a relay client and an aiohttp session per backend, closed
    together at shutdown."""

    def __init__(self, backends: dict[str, BackendConfig]) -> None:
        self._backends = backends
        self._clients: dict[str, Client] = {}
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._retired: list[aiohttp.ClientSession] = []  # replaced by a reload; closed at stop

    def client(self, backend: str) -> Client:
        """The relay's client for `backend`."""
        client = self._clients.get(backend)
        if client is None:
            config = self._backends[backend]
            client = self._clients[backend] = Client(config.timeouts, config.max_connections)
        return client

    def session(self, backend: str) -> aiohttp.ClientSession:
        session = self._sessions.get(backend)
        if session is None or session.closed:
            config = self._backends[backend]
            connector = aiohttp.TCPConnector(
                # Idle connections are dropped before the backend drops them: uvicorn-based
                # servers (vLLM, SGLang) close idle keep-alive connections after 5 s.
                limit=config.max_connections, limit_per_host=0, keepalive_timeout=4,
                enable_cleanup_closed=True,
            )
            session = aiohttp.ClientSession(
                connector=connector, timeout=client_timeout(config), auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[backend] = session
        return session

    def update(self, backends: dict[str, BackendConfig]) -> None:
        """New backend settings: clients of changed or removed backends are closed, each
        connection once its answer is done."""
        for name, session in list(self._sessions.items()):
            if backends.get(name) != self._backends.get(name):
                del self._sessions[name]
                self._retired.append(session)
        for name, client in list(self._clients.items()):
            if backends.get(name) != self._backends.get(name):
                del self._clients[name]
                client.close()
        self._backends = backends

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
        for session in self._retired:
            await session.close()
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
