"""Training: the episodic training loop and the checks of a training/evaluation config."""
