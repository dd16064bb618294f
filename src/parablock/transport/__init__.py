"""How bytes travel between a client and the server: in-process (or through a Ray actor),
emulated links, gRPC with TLS and tokens and its guards, certificates, and fault injection."""
