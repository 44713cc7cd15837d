"""The status page at /ui: escaped server-rendered HTML, checked in a real headless Chromium."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config.schema import parse_config
from gateway.fronts.ui import ui_routes
from tests.emulators import ollama as ollama_emulator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1280, 900)
HEADER_RGB = (0x1D, 0x23, 0x30)  # the page's dark header
LOADED_BADGE_RGB = (0xD1, 0xFA, 0xDF)  # the green "loaded" state badge


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.05))


def start_with_ui(start_server: Any, ollama_url: str, models: dict[str, Any]) -> Any:
    """The gateway with /ui mounted, unless gateway.app mounts it already."""
    app = create_app(parse_config({
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": models,
    }, source="test-config", env={}))
    if not any(getattr(route, "path", None) == "/ui" for route in app.routes):
        app.router.routes.extend(ui_routes(app.state.services))
    return start_server(app)


@pytest.fixture
def gateway(start_server: Any, ollama: Any) -> Any:
    return start_with_ui(start_server, ollama.url, {
        "alpha": {"path": "ollama:a:7b", "size_gb": 4.0, "aliases": ["gpt-4o-mini"]},
    })


def chat(gateway: Any, model: str) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
    })
    assert response.status_code == 200, response.text


def test_page_shows_models_and_swaps(gateway: Any) -> None:
    chat(gateway, "alpha")
    page = httpx.get(gateway.url + "/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<meta http-equiv="refresh"' in page.text
    for text in ("alpha", "gpt-4o-mini", 'class="state loaded"', "ollama", "<td>load</td>"):
        assert text in page.text
    assert "<script" not in page.text and "http://" not in page.text  # no scripts, no assets


def test_everything_from_config_is_escaped(start_server: Any, ollama: Any) -> None:
    gateway = start_with_ui(start_server, ollama.url, {
        "<img src=x onerror=alert(1)>": {"path": "ollama:a:7b", "aliases": ["<b>bold</b>"]},
    })
    page = httpx.get(gateway.url + "/ui").text
    assert "<img" not in page and "<b>bold" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def run_chromium(tmp_path: Path, *args: str) -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_renders_the_page(gateway: Any, tmp_path: Path) -> None:
    chat(gateway, "alpha")
    url = gateway.url + "/ui"
    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert "alpha" in dom and 'class="state loaded">loaded<' in dom
    shot = tmp_path / "ui.png"
    run_chromium(tmp_path, f"--screenshot={shot}", url)
    width, height, colours = png_colours(shot.read_bytes())
    assert (width, height) == WINDOW
    assert len(colours) > 50, "the screenshot is blank or nearly so"
    assert HEADER_RGB in colours and LOADED_BADGE_RGB in colours, "the page's CSS did not apply"


def png_colours(data: bytes) -> tuple[int, int, set[tuple[int, ...]]]:
    """Width, height and the distinct RGB colours of an 8-bit RGB or RGBA PNG (stdlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, offset = {}, 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks[kind] = chunks.get(kind, b"") + data[offset + 8:offset + 8 + length]
        offset += length + 12
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour_type in (2, 6), f"unexpected PNG format {depth}/{colour_type}"
    channels = 3 if colour_type == 2 else 4
    rows = unfilter(zlib.decompress(chunks[b"IDAT"]), width * channels, height, channels)
    colours = {
        tuple(row[x:x + 3]) for row in rows for x in range(0, len(row), channels)
    }
    return width, height, colours


def unfilter(raw: bytes, stride: int, height: int, bpp: int) -> list[bytes]:
    """Undo PNG's per-row filters (None, Sub, Up, Average, Paeth)."""
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = row[i - bpp] if i >= bpp else 0
            up, corner = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                row[i] = (row[i] + paeth(left, up, corner)) & 0xFF
        rows.append(bytes(row))
        previous = row
    return rows


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
