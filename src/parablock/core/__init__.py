"""The algorithm core: client, server, algorithms, aggregation, correction, schedules, blocks,
local training, typed messages, metrics and checkpoints. Nothing here knows how bytes travel."""
