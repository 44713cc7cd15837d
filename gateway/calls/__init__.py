"""One API call from its body to its end: `parse` (the call a body asks for), `owner` (the one
owner of a call's lease, leadership and cache write), `coalescing` (identical calls in flight
share one) and `embedding_batch` (embedding calls merged into one upstream call)."""
