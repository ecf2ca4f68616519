"""Answer metrics for training and evaluation scripts (re-exported from `kblampp.metrics`)."""
from kblampp.metrics import (contains_gold, exact_match, extract_answer, f1_score, mean,  # noqa: F401
                             normalize_answer, score_answer)

__all__ = ["contains_gold", "exact_match", "extract_answer", "f1_score", "mean", "normalize_answer",
           "score_answer"]
