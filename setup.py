"""Install metadata lives in pyproject.toml (PEP 621); this file only lets tools that still
call ``setup.py`` find the setuptools build."""

from setuptools import setup

setup()
