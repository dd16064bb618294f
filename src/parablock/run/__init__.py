"""One run from the settings: the runner (model, data, server, backend, evaluation), the run
directory and its files, and the networked client's site."""
