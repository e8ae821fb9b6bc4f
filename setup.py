"""Package discovery for setuptools; everything else is in pyproject.toml.

Every package under kvdiag/ is found (so a new subpackage can never go missing from a normal
install), plus the one mapping discovery cannot see: the top-level folder kernels/ is installed as
the subpackage kvdiag.kernels (pyproject's package-dir), never as a top-level `kernels`.
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["kvdiag", "kvdiag.*"], exclude=["*.__pycache__"])
setup(packages=sorted({*packages, "kvdiag.kernels"}))
