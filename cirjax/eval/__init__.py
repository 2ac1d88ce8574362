"""Evaluation: exact benchmark metrics, on-device retrieval, dataset evaluators, submissions."""
