"""Metadata lives in pyproject.toml; this file does what only code can: map the top-level kernels/ folder
to the package ``pydistill.kernels`` (a top-level ``kernels`` would collide with Hugging Face's ``kernels``)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["pydistill", "pydistill.*"]) + ["pydistill.kernels"],
    package_dir={"pydistill": "pydistill", "pydistill.kernels": "kernels"},
)
