"""`lifecycle serve`: one KV-cache engine behind OpenAI-compatible REST (FastAPI) and gRPC front ends."""
