"""Protocol-faithful backend emulators for the gateway's tests.

- `tests.emulators.ollama`: Ollama (native /api and its OpenAI layer /v1) with load delays,
  keep_alive expiry and memory-driven eviction.
- `tests.emulators.openai_server`: a vLLM-like OpenAI-compatible server with failure modes and
  sleep mode, also runnable as a process (`python -m tests.emulators.openai_server`).

Nothing is imported here, so that running the server module with `-m` does not import it twice.
"""
