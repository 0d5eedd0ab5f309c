"""The package list, which ``pyproject.toml`` cannot express: a mapped package (``grao_kernels.csrc`` from the
top-level ``csrc/``) next to discovered ones. Everything else is in ``pyproject.toml``."""

from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["grao_kernels*", "grao*"], exclude=["*.__pycache__"])
    + ["grao_kernels.csrc"],
)
