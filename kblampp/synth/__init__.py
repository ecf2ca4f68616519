"""Synthetic worlds and QA (programmatic and LLM generators) for KBLaM++ experiments."""
