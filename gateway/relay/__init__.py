"""Talking to backends: `client` (the relay's HTTP/1.1 client, keep-alive pools), `upstream` (each
backend's clients: the relay's, and aiohttp for the drivers' calls), `proxy` (send a call, turn
every failure into a GatewayError), `stream` (the ASGI response that relays a stream as it
comes), `usage` (token counts read off answers) and `health` (each backend's failures in a row,
which take it out of rotation)."""
