"""Reproducing arXiv 2604.08426: the study's configurations and pipeline (`reproduce`) and the report
with a verdict per claim (`report`)."""
