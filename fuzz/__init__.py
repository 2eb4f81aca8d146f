"""Coverage-guided fuzzing of vmemdev's input surfaces (see targets.py)."""
