"""Evaluation: rewards (rule-based, reward models, pairwise judges) and the held-out metrics (mean reward,
win/tie/loss, RAS, NAG)."""
