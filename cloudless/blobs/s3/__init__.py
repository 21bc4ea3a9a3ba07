"""S3-compatible gateway: an ASGI app over `ObjectService` (see app.py)."""
