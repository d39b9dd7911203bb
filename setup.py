"""The package layout that pyproject.toml cannot express: ``conf/`` (the Hydra configs, at the
top of the repository) ships inside the package as ``limoe.conf``, for editable and regular
installs alike. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["limoe", "limoe.*"]), "limoe.conf"],
    package_dir={"limoe.conf": "conf"},
)
