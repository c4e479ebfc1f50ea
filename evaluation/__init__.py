"""Evaluation: the volumetric protocol, the chunk loop, evaluation runs, results, figures, data set checks."""
