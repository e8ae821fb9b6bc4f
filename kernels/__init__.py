"""Triton kernels of kvdiag (import name `kvdiag.kernels`). Import-light on purpose."""
