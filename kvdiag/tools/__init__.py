"""Offline tools that build kvdiag's shipped package data (run as `python -m kvdiag.tools.<name>`)."""
