"""What crosses between a client and the server: typed messages and their bytes, the codecs of
``link.compression``, and the two seams (``ServerConnection``, ``ServerEndpoint``)."""
