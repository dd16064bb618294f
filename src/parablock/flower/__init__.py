"""ParaBlock on Flower: Flower is the engine (SuperLink, SuperNodes, TLS, node authentication,
the Simulation Engine); ParaBlock supplies the server logic and the client.

- ``bundle.py``: what one Flower message carries each way (typed items and their payloads);
- ``mailbox.py``: the worker's side: a ``ServerConnection`` fed by hand-overs;
- ``worker.py``: ``parablock flower-worker``, the persistent client beside a SuperNode;
- ``client_app.py``: the ClientApp, a thin hand-over between Flower and the worker;
- ``relay.py``: the server's side: ParaBlock's ``Server`` driven through Flower's ``Grid``;
- ``server_app.py``: the ServerApp;
- ``frames.py``: a bundle's frames as a Flower ``ArrayRecord``;
- ``template.py``: ``parablock flower new DIR`` writes a Flower app directory;
- ``local.py``: a Flower deployment on one machine (trials, tests, benchmarks).

Only ``frames.py``, ``client_app.py`` and ``server_app.py`` import ``flwr``.
"""
