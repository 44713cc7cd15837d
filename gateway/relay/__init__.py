"""Talking to backends: `upstream` (one pooled aiohttp session per backend), `proxy` (send a call,
turn every failure into a GatewayError), `stream` (the ASGI response that relays a stream as it
comes) and `usage` (token counts read off answers)."""
