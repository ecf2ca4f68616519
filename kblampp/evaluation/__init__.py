"""Evaluation: every row of the results table (backbone, RAG, oracle context, KBLaM++ variants),
metrics, the KB-edit check, evidence JSON and plots. Modules are imported directly."""
