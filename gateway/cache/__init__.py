"""The response cache: `responses` (lookup and store in the request path), `store` (Redis or an
in-process LRU behind one interface) and `replay` (one stored record answered as JSON or SSE)."""
