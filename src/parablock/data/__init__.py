"""Training data: records and examples, data sources, federated partitions."""
