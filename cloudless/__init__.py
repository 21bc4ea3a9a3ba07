"""Cloudless: one elastic compute fabric from heterogeneous devices."""

# First, so every module's logger (created at import) keeps all `extra` fields.
from cloudless.observability.logging import install_logger_class

install_logger_class()

__version__ = "0.1.0"
