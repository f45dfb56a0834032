"""Built-in drivers (local scheduler, default platform) and the core's own hook plugin.

They are registered through the same entry points as third-party plugins (see pyproject.toml).
"""
