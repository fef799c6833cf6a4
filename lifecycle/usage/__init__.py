"""`lifecycle usage`: a per-key statement of what the server metered (requests, tokens, latency, errors)."""
