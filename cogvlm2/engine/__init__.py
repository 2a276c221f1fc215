"""The serving engine: continuous batching over a paged KV cache (requests in, token ids out)."""
