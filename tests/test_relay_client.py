"""The relay's HTTP/1.1 client against a scripted backend on a real socket."""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config.schema import Timeouts
from gateway.relay import client as client_module
from gateway.relay.client import (
    BrokenOff,
    Client,
    ConnectFailed,
    IncompleteAnswer,
    UpstreamTimeout,
    split_url,
)
from tests.servers import free_port

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
JSON = b'{"ok":true}'


def whole(body: bytes = JSON) -> Answer:
    """A content-length answer; the connection stays open."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(body), body))
        return True
    return answer


class Backend:
    """Each request it reads gets the next answer of `answers`; an answer returning False ends
    the connection. It counts connections and keeps what it was sent."""

    def __init__(self, *answers: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers)
        self._tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.hung_up = asyncio.Event()  # a client closed a connection first
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Backend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if self._tls else "http"
        self.url = f"{scheme}://127.0.0.1:{port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"content-length: (\d+)", head, re.I)
                body = await reader.readexactly(int(found.group(1)) if found else 0)
                self.requests.append(head + body)
                if not await self.answers.pop(0)(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.hung_up.set()
        except asyncio.CancelledError:
            pass  # the test is over: end quietly, not as a cancelled task asyncio reports
        finally:
            writer.close()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    client = Client(Timeouts(connect=2, read=5, pool=1), max_connections=4)
    yield client
    client.close()


async def test_a_json_answer_is_read_whole_and_its_connection_reused(client: Client) -> None:
    async with Backend(whole(), whole(b'{"n":2}')) as backend:
        first = await client.post(backend.url, b'{"q":1}', {"content-type": "application/json"})
        assert first.status == 200 and first.content_type == "application/json"
        assert await first.read() == JSON
        first.release()
        second = await client.post(backend.url, b"{}", {})
        assert await second.read() == b'{"n":2}'
        second.release()
    assert backend.connections == 1
    head, _, body = backend.requests[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"POST /v1/chat/completions HTTP/1.1",
                                   f"host: {split_url(backend.url)[0].host_header}".encode(),
                                   b"content-type: application/json", b"content-length: 7"]
    assert body == b'{"q":1}'


async def test_a_chunked_stream_comes_as_it_is_written(client: Client) -> None:
    step = asyncio.Event()

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await step.wait()  # the client has read the first frame
        writer.write(b"9\r\ndata: 2\n\n\r\n9\r\ndata: 3\n\n\r\n0\r\n\r\n")
        return True

    async with Backend(sse) as backend:
        response = await client.post(backend.url, b"{}", {})
        assert response.content_type == "text/event-stream"
        assert await response.next_chunk() == b"data: 1\n\n"
        step.set()
        rest = b""
        while chunk := await response.next_chunk():
            rest += chunk
        assert rest == b"data: 2\n\ndata: 3\n\n" and response.complete
        response.release()


async def test_an_interim_answer_is_passed_over(client: Client) -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n")
        return await whole()(reader, writer)

    async with Backend(early_hints, whole(b'{"n":2}')) as backend:
        response = await client.post(backend.url, b"{}", {})
        assert response.status == 200 and "link" not in response.headers
        assert await response.read() == JSON
        response.release()
        again = await client.post(backend.url, b"{}", {})
        assert await again.read() == b'{"n":2}'
        again.release()
    assert backend.connections == 1


async def test_a_body_without_length_ends_with_its_connection(client: Client) -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        return False

    async with Backend(until_close, whole()) as backend:
        response = await client.post(backend.url, b"{}", {})
        assert await response.read() == b"all of it"
        response.release()
        again = await client.post(backend.url, b"{}", {})  # on a new connection
        assert await again.read() == JSON
        again.release()
    assert backend.connections == 2


async def test_a_connection_ending_midway_is_an_incomplete_answer(client: Client) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
        return False

    async with Backend(cut) as backend:
        response = await client.post(backend.url, b"{}", {})
        with pytest.raises(IncompleteAnswer):
            await response.read()
        response.close()


async def test_what_came_before_a_drop_is_handed_over_before_the_failure(
        client: Client) -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n")
        return False

    async with Backend(drop) as backend:
        response = await client.post(backend.url, b"{}", {})
        received = b""
        with pytest.raises(IncompleteAnswer):
            while chunk := await response.next_chunk():
                received += chunk
        assert received == b"data: 1\n\ndata: 2\n\n"
        response.close()


async def test_a_stale_pooled_connection_is_retried_once_on_a_new_one(client: Client) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False  # the backend had dropped the idle connection: no answer at all

    async with Backend(whole(), hang_up, whole(b'{"n":2}')) as backend:
        first = await client.post(backend.url, b"{}", {})
        await first.read()
        first.release()
        second = await client.post(backend.url, b"{}", {})
        assert await second.read() == b'{"n":2}'
        second.release()
    assert backend.connections == 2 and len(backend.requests) == 3


async def test_a_fresh_connection_that_answers_nothing_is_not_retried(client: Client) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False

    async with Backend(hang_up, whole()) as backend:
        with pytest.raises(BrokenOff):
            await client.post(backend.url, b"{}", {})
    assert len(backend.requests) == 1


async def test_silence_past_the_read_timeout_fails_and_closes_the_connection() -> None:
    client = Client(Timeouts(connect=2, read=0.2, pool=1), max_connections=4)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await reader.read()  # until the client hangs up
        raise ConnectionResetError

    async with Backend(silent) as backend:
        with pytest.raises(UpstreamTimeout):
            await client.post(backend.url, b"{}", {})
        await backend.hung_up.wait()


async def test_a_refused_connection_says_so(client: Client) -> None:
    with pytest.raises(ConnectFailed) as failed:
        await client.post(f"http://127.0.0.1:{free_port()}/v1/x", b"{}", {})
    assert failed.value.errno == errno.ECONNREFUSED


async def test_closing_an_unfinished_answer_hangs_up_on_the_backend(client: Client) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await reader.read()
        raise ConnectionResetError

    async with Backend(endless) as backend:
        response = await client.post(backend.url, b"{}", {})
        assert await response.next_chunk() == b"hello"
        response.close()
        response.close()  # once is enough; again is harmless
        await backend.hung_up.wait()


async def test_past_max_connections_a_request_waits_for_a_turn() -> None:
    client = Client(Timeouts(connect=2, read=5, pool=0.2), max_connections=1)
    async with Backend(whole(), whole(b'{"n":2}')) as backend:
        first = await client.post(backend.url, b"{}", {})
        with pytest.raises(UpstreamTimeout):
            await client.post(backend.url, b"{}", {})  # no turn while the first is held
        waiting = asyncio.ensure_future(client.post(backend.url, b"{}", {}))
        await first.read()
        first.release()
        second = await waiting
        assert await second.read() == b'{"n":2}'
        second.release()
    client.close()


async def test_a_header_with_a_line_break_is_refused(client: Client) -> None:
    with pytest.raises(ValueError, match="line break"):
        await client.post("http://127.0.0.1:1/v1/x", b"", {"x-bad": "a\r\nhost: evil"})


async def test_a_large_upload_and_a_large_answer_go_whole(client: Client,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "_HIGH_WATER", 1)  # reading pauses at every piece
    upload = bytearray(b"u" * 300_000)  # past one write; held once, as a bytearray
    answer = bytes(range(256)) * 4000

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer))
        for at in range(0, len(answer), 65536):
            writer.write(answer[at:at + 65536])
            await writer.drain()
        return True

    async with Backend(big) as backend:
        response = await client.post(backend.url, upload, {})
        assert await response.read() == answer
        response.release()
    assert backend.requests[0].endswith(b"\r\n\r\n" + upload)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_an_https_backend_is_reached_over_tls_and_its_certificate_checked(
        certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with Backend(whole(), whole(), tls=serving) as backend:
        client = Client(Timeouts(connect=2, read=5, pool=1), 4, tls=trusting)
        response = await client.post(backend.url, b"{}", {})
        assert await response.read() == JSON
        response.release()
        with pytest.raises(ConnectFailed):  # the system's authorities do not know this one
            await Client(Timeouts(connect=2, read=5, pool=1), 4).post(backend.url, b"{}", {})
