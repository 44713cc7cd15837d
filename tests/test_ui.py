"""The status page at /ui: what it shows (read without scripts, over HTTP), and what a person
does with it in a real headless Chromium (driven over the DevTools protocol): read it after the
browser's login prompt, be refused an action without a key, load a model with one, see the
swap timeline drawn."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.browser import Page, chromium
from tests.emulators import ollama as ollama_emulator
from tests.servers import wait_until

WINDOW = (1280, 900)
HEADER_RGB = (0x1D, 0x23, 0x30)  # the page's dark header
OPS, TEAM = "sk-ui-ops", "sk-ui-team"
MESSAGES = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "alpha": {"path": "ollama:a:7b", "size_gb": 4.0, "aliases": ["gpt-4o-mini"], "ttl": 600},
    "beta": {"path": "ollama:b:7b", "size_gb": 6.0},
}


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 6.0}, load_delay=0.05))


def start(start_server: Any, ollama_url: str, models: dict[str, Any] | None = None,
          **config: Any) -> Any:
    app = create_app(parse_config({
        "swapper": {"memory_budget_gb": 12},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": models or MODELS,
        "batching": {"window_ms": 0},
        **config,
    }, source="test-config", env={}), progress_every_s=0.2)
    return start_server(app)


def keyed(start_server: Any, ollama_url: str) -> Any:
    return start(start_server, ollama_url, auth={"keys": [
        {"name": "ops", "key": OPS, "admin": True},
        {"name": "team", "key": TEAM, "models": ["alpha"]}]})


def chat(gateway: Any, model: str, key: str | None = None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    answer = httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                        json={"model": model, "messages": MESSAGES})
    assert answer.status_code == 200, answer.text


def state_of(gateway: Any, model: str, key: str | None = None) -> str:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{gateway.url}/models/{model}", headers=headers).json()["state"]


def cells(page: str, model: str) -> dict[str, str]:
    """The text of the model's row in the models table, by column."""
    table = re.search(r"<h2>Models</h2>.*?</table>", page, re.S)
    assert table, "no models table"
    headers = re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table.group())
    row = re.search(rf"<tr><td><span class=swatch[^>]*></span>{model}\b.*?</tr>", table.group())
    assert row, f"no row for {model}"
    texts = [re.sub(r"<[^>]+>", "", c).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(), re.S)]
    return dict(zip(headers, texts, strict=True))


# -- what the page shows, read as HTML ----------------------------------------------------------


def test_models_swaps_and_timeline_without_scripts(start_server: Any, ollama: Any) -> None:
    gateway = start(start_server, ollama.url)
    for model in ("alpha", "beta", "alpha"):
        chat(gateway, model)
    answer = httpx.get(gateway.url + "/ui")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert '<noscript><meta http-equiv="refresh"' in page  # refreshes without scripts too
    alpha = cells(page, "alpha")
    assert alpha["State"] == "loaded" and alpha["Backend"] == "ollama"
    assert "(gpt-4o-mini)" in alpha["Model"]
    assert re.fullmatch(r"\d+ ms \u00d72", alpha["Last load"]), alpha  # in ms, and how many
    assert re.fullmatch(r"in (9 min \d+ s|10 min)", alpha["Idle unload"]), alpha  # ttl countdown
    assert alpha["Req/min"] == "2.0" and alpha["TTFT p50"].endswith(" ms")
    assert alpha["Memory"] == "4.0 GB measured by ollama"  # its /api/ps, as the config said
    assert alpha["Actions"] == "LoadUnloadPurge cache"
    assert cells(page, "beta")["State"] == "unloaded"
    swaps = re.findall(r'<span class="state (\w+)">\w+</span></td><td class=num>(\d+)</td>',
                       page)
    assert swaps == [("loaded", "1")] * 3  # one row per swap: its outcome, what it served
    assert "<td>beta</td><td>alpha</td>" in page  # unloaded beta, loaded alpha
    timeline = re.search(r"<svg id=timeline.*?</svg>", page, re.S)
    assert timeline is not None
    assert len(re.findall(r'class="bar loaded"', timeline.group())) == 3  # alpha twice, beta
    assert "4.0 GB resident of 12.0 GB" in page  # the node's bar: alpha alone


def test_each_node_has_its_memory_bar_and_timeline_lane(start_server: Any) -> None:
    gpu = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.02))
    mac = start_server(ollama_emulator.create_app({"b:7b": 6.0}, load_delay=0.02))
    app = create_app(parse_config({
        "nodes": {"gpu-box": {"memory_budget_gb": 20}, "macbook": {"mode": "single-active",
                                                                   "memory_budget_gb": 56}},
        "backends": {"gpu": {"kind": "ollama", "base_url": gpu.url, "node": "gpu-box"},
                     "mac": {"kind": "ollama", "base_url": mac.url, "node": "macbook"}},
        "models": {"alpha": {"backend": "gpu", "served_name": "a:7b", "size_gb": 4},
                   "beta": {"backend": "mac", "served_name": "b:7b", "size_gb": 6}},
    }, source="test-config", env={}))
    gateway = start_server(app)
    chat(gateway, "alpha")
    chat(gateway, "beta")
    page = httpx.get(gateway.url + "/ui").text
    assert "4.0 GB resident of 20.0 GB" in page and "6.0 GB resident of 56.0 GB" in page
    lanes = re.findall(r">node ([\w-]+)</text>", page)  # the timeline's, one per node
    assert lanes == ["gpu-box", "macbook"]
    assert cells(page, "alpha")["Node"] == "gpu-box" and cells(page, "beta")["Node"] == "macbook"


def test_the_page_names_no_other_origin_and_allows_only_its_own_script(
        start_server: Any, ollama: Any) -> None:
    gateway = start(start_server, ollama.url)
    answer = httpx.get(gateway.url + "/ui")
    assert "http://" not in answer.text and "https://" not in answer.text
    policy = answer.headers["content-security-policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", answer.text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy and answer.headers["x-frame-options"] == "DENY"


def test_everything_from_config_is_escaped(start_server: Any, ollama: Any) -> None:
    gateway = start(start_server, ollama.url, {
        "<img src=x onerror=alert(1)>": {"path": "ollama:a:7b", "aliases": ["<b>bold</b>"]},
    })
    page = httpx.get(gateway.url + "/ui").text
    assert "<img" not in page and "<b>bold" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_a_failed_load_is_one_line_with_its_retry_time(start_server: Any, ollama: Any) -> None:
    error = "llama runner process has terminated: CUDA out of memory\n" + "trace line\n" * 200
    ollama.server.config.app.state.emulator.load_errors["a:7b"] = error
    gateway = start(start_server, ollama.url)
    refused = httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                         json={"model": "alpha", "messages": MESSAGES})
    assert refused.status_code == 503
    page = httpx.get(gateway.url + "/ui").text
    alpha = cells(page, "alpha")
    assert re.fullmatch(r"failed retry in \d+(\.\d)? s", alpha["State"]), alpha
    details = re.search(r'<details class=error id="error-alpha"><summary>(.*?)</summary>', page)
    assert details and "CUDA out of memory" in details.group(1)
    assert "trace line" not in details.group(1)  # the rest only when opened
    assert page.count("trace line") <= 2 * 200  # in the row's details, and the swap's
    assert '<span class="state failed">failed</span><details class=error' in page  # its swap
    assert 'class="bar failed"' in page  # a red mark in the timeline


def test_a_process_backends_server_shows_its_pid_and_port(
        start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state"))
    cmd = (f"{sys.executable} -m tests.emulators.openai_server --port {{port}} "
           "--model {served_name}")
    gateway = start(start_server, "http://127.0.0.1:9", models={
        "local": {"backend": "local", "served_name": "local"}}, backends={
        "local": {"kind": "process", "cmd": cmd, "env": {"PYTHONPATH": str(ROOT)},
                  "start_timeout": 30}})
    chat(gateway, "local")
    server = httpx.get(gateway.url + "/status").json()["models"]["local"]["server"]
    assert httpx.get(f"http://127.0.0.1:{server['port']}/health").status_code == 200
    assert Path(f"/proc/{server['pid']}").exists()
    page = httpx.get(gateway.url + "/ui").text
    assert f"pid {server['pid']}, port {server['port']}" in cells(page, "local")["Backend"]


def test_a_load_shows_its_progress_against_its_timeout(start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=3.0))
    gateway = start(start_server, slow.url, {"alpha": MODELS["alpha"]})
    waiting = threading.Thread(target=chat, args=(gateway, "alpha"))
    waiting.start()
    try:
        wait_until(lambda: "<progress" in httpx.get(gateway.url + "/ui").text,
                   message="the load on the page")
        state = cells(httpx.get(gateway.url + "/ui").text, "alpha")["State"]
        assert re.fullmatch(r"loading\s+\d+ ms of 10 min|loading\s+\d\.\d s of 10 min", state)
    finally:
        waiting.join(30)


# -- in a browser -------------------------------------------------------------------------------


# The notice once an action has its answer ("load alpha…" while it runs).
ANSWERED = ("(t => /: (done|refused|the gateway did not answer)/.test(t) && t)"
            "(document.getElementById('notice').textContent)")


async def row_state(page: Page, model: str) -> str:
    return str(await page.evaluate(
        f"document.querySelector('button[data-model=\"{model}\"]')"
        ".closest('tr').querySelector('.state').textContent"))


async def test_an_admin_loads_a_model_from_the_page(start_server: Any, ollama: Any,
                                                    tmp_path: Path) -> None:
    gateway = keyed(start_server, ollama.url)
    async with chromium(tmp_path / "profile", WINDOW) as page:
        page.login = ("anyone", OPS)  # what a person types into the browser's prompt
        await page.open(gateway.url + "/ui")
        assert await row_state(page, "alpha") == "unloaded"
        load = "document.querySelector('button[data-action=load][data-model=alpha]').click()"

        await page.evaluate(load)  # no key typed: the remembered login must not act
        notice = await page.wait_for(ANSWERED)
        assert "refused (401)" in notice and "Enter an admin key" in notice
        assert state_of(gateway, "alpha", OPS) == "unloaded"

        await page.evaluate(f"document.getElementById('key').value = '{OPS}';"
                            "document.querySelector('#keyform button[type=submit]').click()")
        assert await page.evaluate("sessionStorage.getItem('swapper-gateway.key')") == OPS
        await page.evaluate(load)
        assert (await page.wait_for(ANSWERED)).endswith("load alpha: done")
        await page.wait_for("document.querySelector('button[data-model=alpha]').closest('tr')"
                            ".querySelector('.state').textContent === 'loaded'")
        assert state_of(gateway, "alpha", OPS) == "loaded"
        # Wide enough to count: the page redraws every few seconds, the residency grows.
        await page.wait_for("(b => b && b.getBoundingClientRect().width >= 30)(document"
                            ".querySelector('#timeline .bar.loaded'))", within_s=30)
        shot = png_pixels(await page.screenshot())
        box = await page.evaluate("(() => { const r = document.getElementById('timeline')"
                                  ".getBoundingClientRect(); return [r.left, r.top, r.right, "
                                  "r.bottom]; })()")
        colour = await page.evaluate("getComputedStyle(document.querySelector("
                                     "'button[data-model=alpha]').closest('tr')"
                                     ".querySelector('.swatch')).backgroundColor")
        assert not page.console, list(page.console)
    width, height, pixels = shot
    assert (width, height) == WINDOW
    assert len(set(pixels.values())) > 50, "the screenshot is blank or nearly so"
    assert HEADER_RGB in set(pixels.values()), "the page's style did not apply"
    alpha = tuple(int(v) for v in re.findall(r"\d+", colour)[:3])
    drawn = [xy for xy, rgb in pixels.items() if rgb == alpha and inside(xy, box)]
    assert len(drawn) >= 20 * 14, f"alpha's residency is not drawn ({len(drawn)} px)"


async def test_without_an_admin_key_the_page_is_read_only(start_server: Any, ollama: Any,
                                                          tmp_path: Path) -> None:
    gateway = keyed(start_server, ollama.url)
    chat(gateway, "beta", OPS)
    async with chromium(tmp_path / "profile", WINDOW) as page:
        page.login = ("anyone", TEAM)
        await page.open(gateway.url + "/ui")
        text = await page.evaluate("document.getElementById('live').innerText")
        assert "alpha" in text and "beta" not in text  # its models only
        assert await page.evaluate("document.querySelectorAll('button[data-action]').length"
                                   " - document.querySelectorAll('[hidden]"
                                   "[data-action]').length") == 0

        page.login = None  # the prompt cancelled, on an origin the browser has no login for
        await page.open(gateway.url.replace("127.0.0.1", "localhost") + "/ui")
        refused = await page.evaluate("document.body.innerText")
        assert '"code":"missing_api_key"' in refused and "alpha" not in refused


async def test_the_page_reads_in_a_browser_without_scripts(start_server: Any, ollama: Any,
                                                           tmp_path: Path) -> None:
    gateway = start(start_server, ollama.url)
    chat(gateway, "alpha")
    async with chromium(tmp_path / "profile", WINDOW) as page:
        await page.open(gateway.url + "/ui", scripts=False)
        text = await page.evaluate("document.body.innerText")
        assert "alpha" in text and "loaded" in text and "Swap timeline" in text
        visible = await page.evaluate("[...document.querySelectorAll('button')]"
                                      ".filter(b => b.offsetParent !== null).length")
        assert visible == 0  # actions need the script: without it none is offered


# -- screenshots --------------------------------------------------------------------------------


def inside(xy: tuple[int, int], box: list[float]) -> bool:
    return box[0] <= xy[0] < box[2] and box[1] <= xy[1] < box[3]


def png_pixels(data: bytes) -> tuple[int, int, dict[tuple[int, int], tuple[int, ...]]]:
    """Width, height and every pixel's RGB of an 8-bit RGB or RGBA PNG (stdlib only)."""
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
    pixels = {(x // channels, y): tuple(row[x:x + 3]) for y, row in enumerate(rows)
              for x in range(0, len(row), channels)}
    return width, height, pixels


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
