"""The online trainer: Kafka micro-batches -> incremental BPR / MF updates in the parameter server."""
