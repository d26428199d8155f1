"""Evaluation: metric functions, the rating / topn / prequential protocols, and the harness that
runs a named model through one of them (EVALUATION.md)."""
