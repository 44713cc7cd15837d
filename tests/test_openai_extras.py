"""Rerank, images and audio through the gateway, routed by model with swapping: the official
`openai` client (images, transcriptions, translations, speech) and httpx (rerank) against
emulated vLLM servers put to sleep and woken by the gateway (single-active)."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
from typing import Any

import httpx
import openai
import pytest

from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator

AUDIO = b"RIFF" + bytes(range(256)) * 64  # what the client uploads (16 KiB)
BACKENDS = {  # name -> (served model, endpoints it declares, emulator options)
    "reranker": ("org/rerank", ["rerank"], {"embedding": True}),
    "painter": ("org/paint", ["images/generations"], {}),
    "voice": ("org/tts", ["audio/speech"], {"token_delay": 0.05}),
    "ears": ("org/whisper", ["audio/transcriptions", "audio/translations"], {}),
    "chat": ("org/chat", ["chat/completions"], {}),
}
LIMIT = 64 * 1024


@pytest.fixture
def backends(start_server: Any) -> dict[str, Any]:
    servers = {}
    for name, (served, _, options) in BACKENDS.items():
        servers[name] = start_server(vllm_emulator.create_app(
            [served], sleep_mode=True, asleep=True, wake_delay=0.01, sleep_delay=0.01, **options))
    return servers


@pytest.fixture
def gateway(start_gateway: Any, backends: dict[str, Any]) -> Any:
    return start_gateway({
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "server": {"max_body_bytes": LIMIT},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {name: {"kind": "vllm-sleep", "base_url": backends[name].url,
                            "endpoints": endpoints}
                     for name, (_, endpoints, _) in BACKENDS.items()},
        "models": {name: {"backend": name, "served_name": served, "size_gb": 1}
                   for name, (served, _, _) in BACKENDS.items()},
    })


def client(gateway: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0,
                         timeout=30)


def awake(backends: dict[str, Any]) -> list[str]:
    return [name for name, server in backends.items() if not emulator(server).sleeping]


# -- rerank ------------------------------------------------------------------------------------

DOCUMENTS = ["a lazy dog sleeps", "the quick brown fox jumps", "cats purr"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
def test_rerank_puts_the_relevant_document_first_on_every_path(
        gateway: Any, backends: dict[str, Any], path: str) -> None:
    answer = httpx.post(gateway.url + path, timeout=30, json={
        "model": "reranker", "query": "quick brown fox", "documents": DOCUMENTS, "top_n": 2})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert results[0]["index"] == 1 and len(results) == 2
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    assert answer.json()["model"] == "reranker"  # named as the client asked
    assert emulator(backends["reranker"]).last_request["model"] == "org/rerank"
    assert awake(backends) == ["reranker"]


def test_rerank_swaps_with_the_chat_model(gateway: Any, backends: dict[str, Any]) -> None:
    chat = client(gateway).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content and awake(backends) == ["chat"]
    rerank = httpx.post(gateway.url + "/v1/rerank", timeout=30, json={
        "model": "reranker", "query": "cats", "documents": DOCUMENTS})
    assert rerank.status_code == 200 and awake(backends) == ["reranker"]


def test_a_repeated_rerank_is_answered_from_the_cache(gateway: Any,
                                                     backends: dict[str, Any]) -> None:
    """A RAG stack reranks the same candidates again and again: scores are a pure function of
    the query and the documents, so the second identical call never reaches the backend."""
    ask = {"model": "reranker", "query": "quick brown fox", "documents": DOCUMENTS}
    first = httpx.post(gateway.url + "/v1/rerank", timeout=30, json=ask)
    again = httpx.post(gateway.url + "/rerank", timeout=30, json=ask)
    other = httpx.post(gateway.url + "/v1/rerank", timeout=30, json={**ask, "query": "cats"})

    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert again.json()["results"] == first.json()["results"]
    assert again.json()["model"] == "reranker"
    assert other.headers["x-cache"] == "MISS"
    assert emulator(backends["reranker"]).requests["org/rerank"] == 2


def test_a_model_whose_backend_has_no_rerank_is_told_so(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/rerank", timeout=30, json={
        "model": "chat", "query": "q", "documents": ["d"]})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unsupported_endpoint"
    assert "/v1/rerank" in answer.json()["error"]["message"]


def test_rerank_without_documents_is_a_clear_400(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/rerank", json={"model": "reranker", "query": "q"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "documents"


# -- images ------------------------------------------------------------------------------------

def test_images_generate_returns_the_pictures_asked_for(gateway: Any,
                                                        backends: dict[str, Any]) -> None:
    images = client(gateway).images.generate(model="painter", prompt="a red fox", n=2,
                                             size="64x32", response_format="b64_json")
    assert len(images.data) == 2
    png = base64.b64decode(images.data[0].b64_json or "")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", png[16:24]) == (64, 32)  # IHDR: width, height
    assert awake(backends) == ["painter"]


# -- transcriptions and translations -----------------------------------------------------------

def test_transcription_of_an_uploaded_file(gateway: Any, backends: dict[str, Any]) -> None:
    text = client(gateway).audio.transcriptions.create(
        model="ears", file=("hello.wav", io.BytesIO(AUDIO), "audio/wav"), language="en")
    assert text.text == vllm_emulator.transcript("org/whisper", AUDIO, tokens=8)
    seen = emulator(backends["ears"]).last_request
    # The upload went through whole, with the backend's own name for the model.
    assert seen["model"] == "org/whisper" and seen["language"] == "en"
    assert seen["file"] == {"filename": "hello.wav", "size": len(AUDIO),
                            "sha256": hashlib.sha256(AUDIO).hexdigest()}


def test_transcription_as_plain_text_and_subtitles(gateway: Any) -> None:
    openai_client = client(gateway)
    expected = vllm_emulator.transcript("org/whisper", AUDIO, tokens=8)
    text = openai_client.audio.transcriptions.create(
        model="ears", file=("a.wav", AUDIO), response_format="text")
    assert text.strip() == expected
    srt = openai_client.audio.transcriptions.create(
        model="ears", file=("a.wav", AUDIO), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ") and expected in srt


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK's, not ours
def test_translation_of_an_uploaded_file(gateway: Any, backends: dict[str, Any]) -> None:
    text = client(gateway).audio.translations.create(model="ears", file=("a.wav", AUDIO))
    assert text.text == vllm_emulator.transcript("org/whisper", AUDIO, tokens=8)
    assert emulator(backends["ears"]).paths["/v1/audio/translations"] == 1


def test_an_upload_over_the_body_limit_is_refused(gateway: Any,
                                                 backends: dict[str, Any]) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        client(gateway).audio.transcriptions.create(model="ears",
                                                    file=("big.wav", b"x" * (LIMIT + 1)))
    assert refused.value.status_code == 413
    assert emulator(backends["ears"]).paths["/v1/audio/transcriptions"] == 0


def test_an_upload_without_a_model_field_is_a_clear_400(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/audio/transcriptions",
                        files={"file": ("a.wav", AUDIO)})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"


def test_a_transcription_that_is_not_multipart_is_a_clear_400(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/audio/transcriptions", json={"model": "ears"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_multipart"


# -- speech ------------------------------------------------------------------------------------

def test_speech_is_relayed_as_it_is_produced(gateway: Any, backends: dict[str, Any]) -> None:
    voice = emulator(backends["voice"])
    words = "one two three four five six"
    with client(gateway).audio.speech.with_streaming_response.create(
            model="voice", voice="alloy", input=words, response_format="wav") as speech:
        assert speech.headers["content-type"] == "audio/wav"
        chunks = speech.iter_bytes()
        first = next(chunks)
        # The first bytes are here while the backend is still speaking.
        assert voice.streams_in_flight == 1
        audio = first + b"".join(chunks)
    assert audio.startswith(b"RIFF") and audio[8:12] == b"WAVE"
    assert audio == b"".join(vllm_emulator.speech_frames("org/tts", words, "alloy", "wav"))
    assert awake(backends) == ["voice"]
