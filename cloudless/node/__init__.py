"""The `cloudless node` process: data dir, bootstrap and join, and the one
nursery that runs every service."""
