"""The UNMODIFIED Balsam 0.7 client syncs ``run()`` apps, submits their jobs to an existing site and
reads each result with its own ``job.result()``, while our site agent and launcher run them.

Run with the python of the 0.7 venv (see test_balsam07_client.py); ``BALSAM_CLIENT_PATH`` points at
the client.yml its ``balsam login`` wrote. Argument: the site id. Prints one JSON object: for each
job, ``{"value": ...}`` (for a ``Point``: its class name, x and y) or ``{"raised": [module, qualname, message, is a ValueError, frames]}``.
"""

import json
import sys
import traceback

from balsam.api import ApplicationDefinition

site_id = int(sys.argv[1])


class SimulationError(Exception):
    """Defined in the user's script: pickled by value with the app, as 0.7 does."""


class Point:
    """A class of the user's script in a return value: pickled by value, as 0.7's runner did."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class Runs(ApplicationDefinition):
    site = site_id

    def run(self, how, x=0):
        def solver():
            if how == "builtin":
                raise ValueError(f"bad input {x}")
            if how == "custom":
                raise SimulationError(f"diverged at step {x}")
            if how == "unpicklable":
                error = ValueError(f"holds a generator {x}")
                error.state = (i for i in range(3))  # dill cannot pickle a generator
                raise error
            if how == "unserializable value":
                return (i for i in range(3))
            if how == "instance":
                return Point(x, -x)
            return {"sum": x + 1, "items": [x, "two"]}

        return solver()


Runs.sync()
hows = ["value", "instance", "builtin", "custom", "unpicklable", "unserializable value"]
jobs = {how: Runs.submit(workdir=f"runs/{i}", how=how, x=41) for i, how in enumerate(hows)}

seen = {}
for how, job in jobs.items():
    try:
        value = job.result(timeout=240)
        seen[how] = {"value": [type(value).__name__, value.x, value.y] if how == "instance" else value}
    except Exception as exc:  # what job.result() raised: the app's exception, rebuilt by 0.7's serializer
        frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
        seen[how] = {"raised": [type(exc).__module__, type(exc).__qualname__, str(exc), isinstance(exc, ValueError),
                                frames]}
print(json.dumps(seen))
