"""Serving workers: replicate the parameter server's tables, retrieve with FAISS, rescore, filter,
diversify and answer over HTTP (docs/serving.md)."""
