"""How a client reaches the server: the seam (``ServerConnection``), in-process calls, emulated
links, and gRPC with TLS and per-client tokens."""
