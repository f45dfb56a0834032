"""The exception of a run() app that a 0.7 client synced is written in 0.7's format, ``(exception,
tblib.Traceback)`` dill pickled. An exception whose ``__init__`` takes other arguments than its args
(``def __init__(self, a, b): super().__init__(f"{a}-{b}")``, a common pattern) pickles but does not
load back (unpickling calls ``cls(*args)``).

Before: the payload was written without a check that it loads: neither our client's job.result()
(DeserializeError: TypeError missing 'b') nor 0.7's could read the app's error at all."""

from __future__ import annotations

import base64

import dill

from balsam._api import codec, python_runner


class Needs2(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")
        self.a, self.b = a, b


class NeedsKeyword(ValueError):
    def __init__(self, *, code):
        super().__init__(f"code {code}")


class App07:
    _serialized_class = ""  # not our envelope: a 0.7 client synced it


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_our_client_reads_the_error_of_a_07_app() -> None:
    payload = python_runner.serialize_exception(App07, _raised(Needs2(1, 2)))
    exc = codec.deserialize_exception(payload)  # our job.result() path
    # Its builtin base, with the type's name in the message; the traceback kept.
    assert type(exc) is Exception and str(exc) == f"{__name__}.Needs2: 1-2", exc
    assert exc.__traceback__ is not None


def test_the_07_client_loads_it() -> None:
    for raised, base, text in ((Needs2(1, 2), Exception, "1-2"), (NeedsKeyword(code=7), ValueError, "code 7")):
        payload = codec.serialize_exception_07(_raised(raised))
        exc, tb = dill.loads(base64.b64decode(payload))  # what 0.7's job.result() does
        assert type(exc) is base and str(exc).endswith(text) and type(raised).__qualname__ in str(exc), exc
        assert tb is not None


def test_an_exception_that_loads_back_is_kept_as_it_is() -> None:
    payload = codec.serialize_exception_07(_raised(KeyError("missing")))
    exc, _tb = dill.loads(base64.b64decode(payload))
    assert type(exc) is KeyError and exc.args == ("missing",)
