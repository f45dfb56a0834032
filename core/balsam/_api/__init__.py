"""The Python API implementation; import the public names from :mod:`balsam.api`."""
