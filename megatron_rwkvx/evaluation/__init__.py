"""Evaluation: passkey retrieval, loss by position, the lm-evaluation-harness adapter, PNG plots."""
