"""Cloudless: one elastic compute fabric from heterogeneous devices."""

__version__ = "0.1.0"
