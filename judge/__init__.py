"""LLM-as-judge: pairwise judgements with position swap, grading, and arena ratings (`judge.arena`)."""
