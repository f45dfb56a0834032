"""dill + base64 payloads: job parameters, return values, exceptions and app classes.

The wire format is the one of Balsam 0.7 (``base64(dill.dumps(obj, recurse=True))``), so
payloads written by 0.7 clients load here. App classes written by this client are wrapped in a
small envelope that records the Python version: dill cannot load code objects across Python
minor versions, so a mismatch fails with a message saying which versions are involved.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import sys
import threading
from typing import Any, Callable, Optional

from tblib import Traceback

APP_ENVELOPE_KEY = "balsam_app_class"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _dill() -> Any:
    """dill, imported on first use: ~20 ms of CPU that a launcher of shell-command apps never
    spends (their payloads are empty, or plain data that the C unpickler loads)."""
    import dill
    import dill.source

    return dill


def warm_up() -> None:
    """Import what deserializing an app class needs, ahead of the first load (a launcher's thread
    that prefetches the site's apps calls this, off the first job's path)."""
    _dill()


class SerializeError(ValueError):
    pass


class DeserializeError(ValueError):
    pass


class EmptyPayload(DeserializeError):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(payload: str) -> bytes:
    if not payload:
        raise EmptyPayload("empty payload")
    try:
        return base64.b64decode(payload.encode("ascii") if isinstance(payload, str) else payload, validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise DeserializeError(f"payload is not base64: {exc}") from None


class _NotPlainData(Exception):
    """The object holds something other than plain data: only dill pickles it as the site needs."""


class _PlainDataPickler(pickle.Pickler):
    """The C pickler for plain data (dicts, lists, tuples, sets, strings, bytes, numbers, None,
    booleans: what most job parameters are), at dill's protocol (pickle's default): dill pickles
    such data at ~15x the cost (120 us for a small dict; a third of building 100,000 jobs with
    ``submit(save=False)``). The payload loads to the same value as dill's, by any unpickler (a
    Balsam 0.7 runner's included); its bytes are dill's too, except for a few container sizes,
    where dill's pure-Python pickler splits the items in batches of 1,000 otherwise than the C one:
    dicts of k*1000 or k*1000+1 items, lists of k*1000+1, sets of k*1000 (1 or 2 bytes differ; the
    tests check both properties). ``reducer_override`` is called for every object that is not of one of
    those exact types, and sends the object to dill: a class, a function or an instance is pickled
    by dill (by value where it was defined in ``__main__``, so the compute node can load it)."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlainData


def _plain_dumps(obj: Any) -> Optional[bytes]:
    buffer = io.BytesIO()
    try:
        _PlainDataPickler(buffer, protocol=pickle.DEFAULT_PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - not plain data (or too deep): dill decides, and words errors
        return None
    return buffer.getvalue()


def serialize(obj: Any) -> str:
    plain = _plain_dumps(obj)
    if plain is not None:
        return _b64(plain)
    try:
        return _b64(_dill().dumps(obj, recurse=True))
    except Exception as exc:  # noqa: BLE001 - dill raises many kinds
        raise SerializeError(f"cannot serialize {type(obj).__name__}: {type(exc).__name__}: {exc}") from None


class _NeedsDill(Exception):
    """The payload refers to a class or function: only dill's unpickler may load it."""


class _PlainDataUnpickler(pickle.Unpickler):
    """The C unpickler for payloads of plain data (dicts, lists, strings, numbers... what most job
    parameters and return values are): such a payload refers to no global name, and dill's
    unpickler would build the same objects at ~10x the cost (its set-up alone is ~10 us, the
    largest part of reading a listed job's parameters). Any global reference raises, and the
    payload is loaded by dill from the start."""

    def find_class(self, module: str, name: str) -> Any:
        raise _NeedsDill(f"{module}.{name}")


def deserialize(payload: str) -> Any:
    data = _unb64(payload)
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - a global, or not a valid pickle: dill decides (and words errors)
        pass
    try:
        return _dill().loads(data)
    except Exception as exc:  # noqa: BLE001
        raise DeserializeError(f"cannot deserialize payload: {type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------------------------------ exceptions
#: Links of an exception chain (``raise ... from err``, or an error while handling another) kept
#: in a payload: the cause is often the real error (``RuntimeError("simulation failed") from err``).
EXCEPTION_CHAIN_MAX = 8
#: Characters of an exception's message kept (head and tail) when the whole one does not fit the limit.
_SHORT_MESSAGE_CHARS = 4_000
#: Frames of a traceback kept (see _traceback_dict), and when the whole payload does not fit.
TRACEBACK_MAX_FRAMES = 100
_SHORT_TRACEBACK_FRAMES = 30


def _linked(exc: BaseException) -> "tuple[Optional[BaseException], str]":
    """The exception ``exc`` was raised from or while handling, as Python prints it: (exception, kind)."""
    if exc.__cause__ is not None:
        return exc.__cause__, "cause"
    if exc.__context__ is not None and not exc.__suppress_context__:
        return exc.__context__, "context"
    return None, ""


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as problem:  # noqa: BLE001 - a __str__ that raises still leaves the type
        return f"<str() of the exception failed: {type(problem).__name__}: {problem}>"


def _shorten(message: str, keep: int) -> str:
    if len(message) <= keep:
        return message
    half = keep // 2
    return f"{message[:half]} ... [{len(message) - 2 * half:,} characters cut] ... {message[-half:]}"


def _traceback_dict(tb: Any, frames: int) -> Optional[dict]:
    """tblib's dict of the traceback ``tb``, of at most ``frames`` frames: the outermost tenth (where
    run() was entered) and the innermost rest (where the error was raised). tblib converts the
    dict recursively, one level per frame: a RecursionError's ~1,000 frames made that fail with a
    RecursionError of its own, so the runner reported nothing and result() said "no result"."""
    if tb is None:
        return None
    try:
        nodes = []
        node: Any = Traceback(tb)  # built in a loop, whatever the depth
        while node is not None:
            nodes.append(node)
            node = node.tb_next
        if len(nodes) > frames:
            head = max(1, frames // 10)
            nodes[head - 1].tb_next = nodes[len(nodes) - (frames - head)]
        return nodes[0].to_dict()
    except Exception:  # noqa: BLE001 - the exception is still reported, without its traceback
        return None


def _exception_envelope(exc: BaseException, *, short: bool, chain: bool) -> dict[str, Any]:
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    message = _message(exc)
    value: Optional[bytes] = None
    if short:
        # Too long whole (a message quoting a large array): the same type with the shortened
        # message where it takes one, so that ``except ValueError`` still catches it.
        message = _shorten(message, _SHORT_MESSAGE_CHARS)
        try:
            value = _dill().dumps(type(exc)(message), recurse=True)
        except Exception:  # noqa: BLE001 - a type that takes other arguments: type name and message only
            value = None
    else:
        try:
            value = _dill().dumps(exc, recurse=True)
        except Exception:  # noqa: BLE001 - unpicklable exception: keep its type name and message
            value = None
    envelope: dict[str, Any] = {
        "balsam_exception": 1,
        "type_name": type_name,
        "message": message,
        "value": value,
        "traceback": _traceback_dict(exc.__traceback__, _SHORT_TRACEBACK_FRAMES if short else TRACEBACK_MAX_FRAMES),
    }
    if chain:
        links: list[dict[str, Any]] = []
        seen = {id(exc)}
        linked, kind = _linked(exc)
        while linked is not None and id(linked) not in seen and len(links) < EXCEPTION_CHAIN_MAX:
            seen.add(id(linked))
            link = _exception_envelope(linked, short=short, chain=False)
            link["kind"] = kind
            links.append(link)
            linked, kind = _linked(linked)
        if links:
            envelope["chain"] = links
    return envelope


def serialize_exception(exc: BaseException, limit: Optional[int] = None) -> str:
    """An exception with its traceback (tblib) and the exceptions it was raised from (its
    ``__cause__``/``__context__`` chain), for ``Job.serialized_exception``.

    ``limit``: the most characters the payload may have (what the server stores). A longer one
    keeps the exception's type with a shortened message and the innermost frames of its
    traceback, then drops the chain, then keeps only the type name and message: a run() whose
    exception quoted a large value otherwise lost it whole (the server refused the payload)."""
    tries = [(False, True)] if limit is None else [(False, True), (True, True), (True, False)]
    payload = ""
    for short, chain in tries:
        payload = _b64(pickle.dumps(_exception_envelope(exc, short=short, chain=chain)))
        if limit is None or len(payload) <= limit:
            return payload
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    envelope = {"balsam_exception": 1, "type_name": type_name,
                "message": _shorten(_message(exc), min(_SHORT_MESSAGE_CHARS, max(0, limit // 4))), "value": None,
                "traceback": None}
    return _b64(pickle.dumps(envelope))


def _builtin_base(cls: type) -> type:
    """The nearest base of the exception class ``cls`` that every Python can load (``Exception``
    at worst)."""
    return next(base for base in cls.__mro__ if base.__module__ == "builtins" and issubclass(base, BaseException))


def _dill_exception_07(exc: BaseException, frames: Optional[int]) -> Optional[str]:
    """``base64(dill((exc, tblib.Traceback or None)))`` if dill pickles ``exc`` and loads it back;
    the traceback at most ``frames`` frames (None: left out)."""
    tb: Optional[Traceback] = None
    if frames is not None:
        tb_dict = _traceback_dict(exc.__traceback__, frames)
        try:
            tb = Traceback.from_dict(tb_dict) if tb_dict else None
        except Exception:  # noqa: BLE001 - the exception is still reported, without its traceback
            tb = None
    try:
        data = _dill().dumps((exc, tb), recurse=True)
        # Loaded back too: an exception whose __init__ takes other arguments than its args
        # (``def __init__(self, a, b): super().__init__(f"{a}-{b}")``) pickles, but unpickling
        # calls ``cls(*args)`` and fails, in either client's job.result(): a simpler one is tried.
        _dill().loads(data)
    except Exception:  # noqa: BLE001 - dill raises many kinds: the caller tries a simpler exception
        return None
    return _b64(data)


def serialize_exception_07(exc: BaseException, limit: Optional[int] = None) -> str:
    """The exception of a run() app in Balsam 0.7's format, ``(exception, tblib.Traceback)`` dill
    pickled, for the apps a 0.7 client synced: its ``job.result()`` unpacks that tuple (our envelope
    made it raise "too many values to unpack (expected 2)"). :func:`deserialize_exception` reads it
    too. 0.7 pickles no ``__cause__`` chain (nor does this).

    The exception is replaced by a simpler one the 0.7 client can load where needed: one of our
    own modules' (``SerializeError``; the 0.7 client's ``balsam`` package has no such module) by its
    nearest builtin base with the same message; one dill cannot pickle (an attribute holding a
    generator, a socket...) or load back (an ``__init__`` taking other arguments than its args) by
    its own type with its message, else by its builtin base with the type
    name in the message (0.7's own runner printed no marker then: result() raised NoResult). Over
    ``limit`` characters: the message shortened and the innermost frames, then no traceback."""
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    message = _message(exc)
    if type(exc).__module__.split(".")[0] == __name__.split(".")[0]:
        exc = _builtin_base(type(exc))(message).with_traceback(exc.__traceback__)
    cls, base = type(exc), _builtin_base(type(exc))
    short = _shorten(message, _SHORT_MESSAGE_CHARS)
    for frames, text in ((TRACEBACK_MAX_FRAMES, message), (_SHORT_TRACEBACK_FRAMES, short), (None, short)):
        # The exception itself (whole message only), else the same type, else its builtin base.
        makers: list[Callable[[], BaseException]] = [lambda: exc] if text is message else []
        makers += [lambda: cls(text), lambda: base(f"{type_name}: {text}")]
        for make in makers:
            try:
                candidate = make().with_traceback(exc.__traceback__)
            except Exception:  # noqa: BLE001 - a type that takes other arguments: its builtin base
                continue
            payload = _dill_exception_07(candidate, frames)
            if payload is None:
                continue  # dill cannot pickle it: a simpler one
            if limit is None or len(payload) <= limit:
                return payload
            break  # too long: a shorter message and traceback
    keep = _SHORT_MESSAGE_CHARS if limit is None else min(_SHORT_MESSAGE_CHARS, max(2, limit // 4))
    fallback = base(_shorten(f"{type_name}: {message}", keep))
    return _b64(_dill().dumps((fallback, None), recurse=True))


class RemoteException(Exception):
    """Stands in for an exception from a run() app that could not be rebuilt here."""


def _exception_from_envelope(envelope: dict[str, Any]) -> BaseException:
    exc: Optional[BaseException] = None
    if envelope.get("value") is not None:
        try:
            exc = _dill().loads(envelope["value"])
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteException(f"{envelope['type_name']}: {envelope['message']}")
    if envelope.get("traceback"):
        try:
            exc = exc.with_traceback(Traceback.from_dict(envelope["traceback"]).as_traceback())
        except Exception:  # noqa: BLE001 - a traceback we cannot rebuild is not worth failing for
            pass
    return exc


def deserialize_exception(payload: str) -> BaseException:
    data = _unb64(payload)
    try:
        envelope = pickle.loads(data)
    except Exception:  # noqa: BLE001 - not our envelope: maybe a plain dill payload
        envelope = None
    if not (isinstance(envelope, dict) and envelope.get("balsam_exception") == 1):
        obj = envelope if isinstance(envelope, (BaseException, tuple)) else deserialize(payload)
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], BaseException):
            # Balsam 0.7's payload: ``(exception, tblib.Traceback or None)``.
            exc, tb = obj
            if isinstance(tb, Traceback):
                try:
                    exc = exc.with_traceback(tb.as_traceback())
                except Exception:  # noqa: BLE001 - as above
                    pass
            return exc
        if isinstance(obj, BaseException):
            return obj
        return RemoteException(repr(obj))
    exc = _exception_from_envelope(envelope)
    # Rebuild the chain as Python prints it: "The above exception was the direct cause of ...".
    outer = exc
    for link in envelope.get("chain") or ():
        inner = _exception_from_envelope(link)
        try:
            if link.get("kind") == "cause":
                outer.__cause__ = inner
            else:
                outer.__context__ = inner
        except (AttributeError, TypeError):  # pragma: no cover - exceptions always take them
            break
        outer = inner
    return exc


# ------------------------------------------------------------------------------------ app classes
#: Serializations of app classes one at a time: each changes the class for its duration (below).
_serialize_lock = threading.RLock()


def app_id_of(cls: type) -> Optional[int]:
    """``cls.__app_id__`` read between serializations: one in progress in another thread takes the
    client's state off the class for a few milliseconds (below), when the id would read None."""
    with _serialize_lock:
        return getattr(cls, "__app_id__", None)


def serialize_app_class(cls: type, *, root: Optional[type] = None, without: tuple[str, ...] = ()) -> str:
    """Serialize an ApplicationDefinition subclass by value (its code travels to the site).

    ``without``: class attributes left out of the payload, on ``cls`` and on its bases below
    ``root`` (the client's own state, such as the app id: set again where the class is loaded, and
    in the payload they would make it differ after every sync, and ``_serialized_class`` would
    nest the previous payload in each new one)."""
    with _serialize_lock:
        module = cls.__module__
        removed: list[tuple[type, str, Any]] = []
        try:
            for klass in cls.__mro__:
                if root is None or klass is root or not issubclass(klass, root):
                    continue
                for name in without:
                    if name in klass.__dict__:
                        removed.append((klass, name, klass.__dict__[name]))
                        delattr(klass, name)
            # dill pickles importable classes by reference; the site may not be able to import the
            # user's module, so pretend it lives in __main__ to force pickling by value.
            cls.__module__ = "__main__"
            inner = _dill().dumps(cls, recurse=True)
        except Exception as exc:  # noqa: BLE001
            raise SerializeError(f"cannot serialize app {cls.__name__}: {type(exc).__name__}: {exc}") from None
        finally:
            cls.__module__ = module
            for klass, name, value in removed:
                if name not in klass.__dict__:  # another thread's sync() may have set a newer one meanwhile
                    setattr(klass, name, value)
    envelope = {APP_ENVELOPE_KEY: 1, "python": PYTHON_VERSION, "name": cls.__name__, "class": inner}
    return _b64(pickle.dumps(envelope, protocol=4))


def app_payload_python_version(payload: str) -> Optional[str]:
    """The Python version recorded in an app payload (None for Balsam 0.7 payloads)."""
    try:
        envelope = pickle.loads(_unb64(payload))
    except Exception:  # noqa: BLE001
        return None
    if isinstance(envelope, dict) and envelope.get(APP_ENVELOPE_KEY) == 1:
        return str(envelope.get("python"))
    return None


def deserialize_app_class(payload: str, *, name: str = "?", app_id: Any = None) -> type:
    data = _unb64(payload)
    envelope: Any = None
    try:
        # The envelope is a plain pickle of builtins: safe to read in any Python version.
        envelope = pickle.loads(data)
    except Exception:  # noqa: BLE001 - not an envelope
        envelope = None
    is_envelope = isinstance(envelope, dict) and envelope.get(APP_ENVELOPE_KEY) == 1
    if name == "?" and is_envelope and isinstance(envelope.get("name"), str):
        name = envelope["name"]  # the class's name, recorded when it was serialized (the runner knows no other)
    label = f"App(id={app_id}, name={name})"
    if is_envelope:
        version = str(envelope.get("python"))
        if version != PYTHON_VERSION:
            raise DeserializeError(
                f"{label} was serialized with Python {version} but this is Python {PYTHON_VERSION}: "
                f"run the site (or set the app's python_exe) with Python {version}, or re-sync the app "
                f"from Python {PYTHON_VERSION}"
            )
        try:
            return _dill().loads(envelope["class"])
        except ModuleNotFoundError as exc:
            raise DeserializeError(
                f"cannot load {label}: its code needs module {exc.name!r}, which is not installed here "
                f"(install it in this Python, or define the app in the submitting script)"
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise DeserializeError(f"cannot load {label}: {type(exc).__name__}: {exc}") from None
    # A Balsam 0.7 payload: the dill bytes of the class itself, Python version unknown.
    try:
        return envelope if isinstance(envelope, type) else _dill().loads(data)
    except Exception as exc:  # noqa: BLE001
        raise DeserializeError(
            f"cannot load {label} (serialized by a Balsam 0.7 client, Python version not recorded; "
            f"this is Python {PYTHON_VERSION}; a different Python version is the usual cause): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def get_source(obj: Any) -> str:
    return _dill().source.getsource(obj, lstrip=True)
