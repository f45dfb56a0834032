"""ApplicationDefinition: how users describe an app (a shell command template or a Python run()).

Class attributes: ``site`` (name, id or Site), ``command_template`` (Jinja2) *or* ``run(self, ...)``,
``parameters``, ``transfers``, ``environment_variables``, ``cleanup_files``, ``python_exe``.
An instance is made per job and per hook call (``self.job`` is the Job); hooks ``preprocess``,
``postprocess``, ``handle_error``, ``handle_timeout`` and ``shell_preamble`` can be overridden.

Loading apps serialized by Balsam 0.7 clients needs the names ``ApplicationDefinition``,
``ApplicationDefinitionMeta`` and ``AppType`` to stay in this module.
"""

from __future__ import annotations

import base64
import enum
import functools
import inspect
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Union

from balsam.states import JobState

from . import codec
from .run_markers import EXCEPTION_MARKER, RETURN_MARKER, scan_run_markers  # noqa: F401 (the markers: re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from .models import App, Job, Site

logger = logging.getLogger(__name__)
#: (app class, unknown parameter names) already warned about by submit(): once each, not per job.
_WARNED_UNUSED_PARAMS: set[tuple[type, tuple[str, ...]]] = set()

_TEMPLATE_VAR = re.compile(r"{{(.*?)}}")
#: argv chunk size when a run() app and its job are passed on the command line
ARG_CHUNK_SIZE = 128_000
RUNNER_MODULE = "balsam._api.python_runner"
#: The variables that hold this process's MPI rank, in the order the runner reads them
#: (:func:`balsam._api.python_runner.mpi_rank`, which keeps its own copy: it cannot import this
#: module before it has set up): PMI-1/2 (MPICH hydra, Intel MPI, Slurm's pmi2), PMIx, Open MPI,
#: MVAPICH, ALPS (aprun), Cray PALS (Aurora's and Polaris' mpiexec, and Slurm's cray_shasta, the
#: default MPI plugin of Perlmutter's srun). Then ``SLURM_PROCID``, only when ``SLURM_TASK_PID`` is
#: this process (:data:`RUNNER_BOOTSTRAP`).
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "ALPS_APP_PE", "PALS_RANKID")
#: The ``-c`` program that starts the runner in a ``python_exe`` other than this Python (see
#: :func:`python_runner_command`). ``-m`` in a Python without Balsam (a bare venv, a container
#: without it) ended with Python's own "No module named 'balsam'" and exit status 1, one of serial
#: mode's quick-failure codes: started up to 4 times, each failing the same way. This program says
#: so in the runner's one line (:func:`balsam._api.python_runner.cannot_run`) and exits 78
#: (``CANNOT_RUN_EXIT``), not relaunched; otherwise it runs the runner as ``-m`` does. One line with
#: no ``'`` (one shell-quoted word, also under a python_exe of shell words such as ``apptainer exec
#: img.sif python3``): statements joined by ``;``, hence no if/try. Python 2 syntax as well (no
#: f-string, no print()): Python compiles the whole program first, and a Python 2 ``python_exe``
#: printed a SyntaxError with the program in it (4 lines, exit 1) instead of the one line.
RUNNER_BOOTSTRAP = ";".join((
    "import os,sys,platform",
    # What -m puts first on sys.path: the directory it started in, not "" (which follows a run()
    # that chdirs: a module of the job's workdir was no longer found, and a file of the new
    # directory named like a stdlib module shadowed it).
    'sys.path[:1]==[""]and sys.path.__setitem__(0,os.getcwd())',
    # The rank (the line on rank 0 only, as cannot_run()). SLURM_PROCID only in the task srun
    # started itself (--mpi=none sets no other): a task started under another srun step (an older
    # launcher's serial worker k passed SLURM_PROCID=k to its tasks) must not take it for its own.
    # Digits checked without str.isdecimal, which Python 2's str lacks.
    'e=os.environ.get',
    'r=next((int(v) for v in [e(x) for x in "' + " ".join(RANK_VARIABLES) + '".split()]+[e("SLURM_TASK_PID")'
    '==str(os.getpid())and e("SLURM_PROCID")] if v and v.strip() and not v.strip().strip("0123456789")),0)',
    'm=lambda s:(r or sys.stderr.write("balsam: the run() app cannot run in %s (Python %s): %s the app\\x27s '
    'python_exe to a Python that has Balsam\\n"%(sys.executable,platform.python_version(),s)),sys.exit(78))',
    'sys.version_info<(3,4)and m("Balsam needs Python 3; set")',
    # The first of Balsam, its _api package and the runner that is not there ("" when all are):
    # find_spec imports a dotted name's parent, so each is looked up only once its parent is found.
    # A module Balsam's own imports lack is not caught here (the runner words it, exit 78 too).
    f'n=next((x for x in ("balsam","balsam._api","{RUNNER_MODULE}") if not '
    '__import__("importlib.util").util.find_spec(x)),"")',
    # A Balsam without this runner is an older one (0.7 runs balsam.site.launcher.python_runner).
    'n and m(("module %r is not installed there; install Balsam into it" if n=="balsam" else "its Balsam has '
    'no module %r (an older Balsam, such as 0.7); install the current Balsam into it")%n+", or set")',
    # __main__ as -m leaves it: what -m itself calls (in CPython 3.6 to 3.13 alike), the runner in
    # __main__ for good, with sys.argv[0] its file. runpy.run_module(alter_sys=True) put __main__
    # and argv[0] back when the runner's sys.exit went through it: a thread or atexit handler of
    # run() then saw the program's __main__. The program's own names go first (-m has none).
    "del e,r,m,n",
    f'__import__("runpy")._run_module_as_main("{RUNNER_MODULE}")',
))
_RUNNER_BOOTSTRAP_WORD = shlex.quote(RUNNER_BOOTSTRAP)
#: Linux's cap on one exec argument (MAX_ARG_STRLEN): a runner line with the job's raw JSON goes
#: through ``bash -c`` as one argument, so the JSON goes raw only in a line under this.
RAW_JOB_LINE_MAX_BYTES = 131_072


class AppType(str, enum.Enum):
    SHELL_CMD = "SHELL_CMD"
    PY_FUNC = "PY_FUNC"


def _param_from_signature(param: inspect.Parameter) -> dict[str, Any]:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        help_text = ""
    else:
        help_text = getattr(ann, "__name__", None) or str(ann)
    if param.default is inspect.Parameter.empty:
        return {"required": True, "default": None, "help": help_text}
    return {"required": False, "default": param.default, "help": help_text}


def _either(model_error: type[Exception], message: str) -> Exception:
    """An error that is both ``model_error`` (what Balsam 0.7 let through: ``Site.DoesNotExist``,
    ``App.MultipleObjectsReturned``) and ValueError (what this API says), for either ``except``."""
    both = type(model_error.__name__, (model_error, ValueError), {"__qualname__": model_error.__qualname__})
    return both(message)


def _check_dict_param(app: str, name: str, param: Any) -> dict[str, Any]:
    if not isinstance(param, dict):
        raise AttributeError(f"ApplicationDefinition {app}: parameter {name!r} must be a dict with 'required' (and 'default', 'help')")
    if "required" not in param:
        raise AttributeError(f"ApplicationDefinition {app}: parameter {name!r} must set 'required' to True or False")
    if not param["required"] and param.get("default") is None:
        raise AttributeError(f"ApplicationDefinition {app}: optional parameter {name!r} needs a 'default' value")
    unknown = set(param) - {"required", "default", "help"}
    if unknown:
        # Balsam 0.7 took such keys (its server dropped them): a class written for it must still load.
        logger.warning("ApplicationDefinition %s: parameter %r: keys %s are not used (only required, default, help)",
                       app, name, sorted(unknown))
    return {"required": bool(param["required"]), "default": param.get("default"), "help": str(param.get("help", ""))}


#: ``{{ name }}`` in a command template, the only markup the plain-template path reads.
_PLAIN_TEMPLATE_VAR = re.compile(r"{{[ \t]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*}}")
#: Where Jinja2 markup starts ({{, {% or {#), and the carriage returns Jinja2 would rewrite.
_JINJA_MARKUP_START = re.compile(r"{[{%#]|\r")
#: Names Jinja2 does not read as a plain variable: constants, keywords, the template itself and
#: the default globals (jinja2.defaults.DEFAULT_NAMESPACE); templates using them go to Jinja2.
_JINJA_SPECIAL_NAMES = frozenset(
    {"true", "false", "none", "True", "False", "None", "self", "range", "dict", "lipsum", "cycler", "joiner",
     "namespace", "and", "or", "not", "in", "is", "if", "else", "elif", "endif", "for", "endfor", "import",
     "from", "as", "with", "without", "context", "recursive", "block", "extends", "include", "macro", "call",
     "set", "filter", "raw", "pluck", "ignore", "missing", "scoped", "required"}
)


@functools.lru_cache(maxsize=256)
def _plain_template(command_template: str) -> Optional[tuple[str, ...]]:
    """The template as (text, name, text, name, ..., text) when it is plain text and ``{{ name }}``
    substitutions only (what almost every command line is), else None. Such a template is read and
    rendered here exactly as Jinja2 would, without importing Jinja2 (~40 ms of a launcher's start)."""
    if command_template.endswith("\n"):  # Jinja2 drops one trailing newline (keep_trailing_newline)
        return None
    parts = tuple(_PLAIN_TEMPLATE_VAR.split(command_template))
    starts = {m.start() for m in _PLAIN_TEMPLATE_VAR.finditer(command_template)}
    if any(m.start() not in starts for m in _JINJA_MARKUP_START.finditer(command_template)):
        return None
    if any(name in _JINJA_SPECIAL_NAMES for name in parts[1::2]):
        return None
    return parts


def template_variables(command_template: str) -> set[str]:
    plain = _plain_template(command_template)
    if plain is not None:
        return set(plain[1::2])
    # Only templates with Jinja2 markup beyond {{ name }} need it (a ~40 ms import).
    import jinja2
    import jinja2.meta

    try:
        ast = jinja2.Environment().parse(command_template)
    except jinja2.TemplateSyntaxError as exc:
        raise AttributeError(f"command_template is not a valid Jinja2 template (line {exc.lineno}): {exc.message}") from None
    return set(jinja2.meta.find_undeclared_variables(ast))



#: The last environment decoded by :func:`_environ_copy`: (its bytes mapping, copied; the decoded dict).
_environ_cache: tuple[dict[bytes, bytes], dict[str, str]] = ({}, {})


def _environ_copy() -> dict[str, str]:
    """``dict(os.environ)`` at a small part of its cost: the launchers call ``get_environ_vars`` for
    every job, and decoding every variable (the mapping's encode/decode calls) dominated it: 40 us
    for an environment of 240 variables, common on machines with modules loaded. The decoded copy
    is kept and reused while the environment's bytes compare equal (a C-level comparison, 2-3 us),
    so a change to ``os.environ`` is seen at the next call. Decodes as ``os.environ`` does (file
    system encoding, surrogateescape). Thread-safe: the cache is one tuple, replaced whole."""
    global _environ_cache
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return dict(os.environ)
    raw, decoded = _environ_cache
    if raw != data:
        encoding = sys.getfilesystemencoding()
        raw = dict(data)
        decoded = {k.decode(encoding, "surrogateescape"): v.decode(encoding, "surrogateescape") for k, v in raw.items()}
        _environ_cache = (raw, decoded)
    return dict(decoded)


class ApplicationDefinitionMeta(type):
    """Validates an app class when it is defined (and when a serialized one is loaded)."""

    def __new__(mcls, name: str, bases: tuple, attrs: dict[str, Any]) -> "ApplicationDefinitionMeta":
        if "parameters" in attrs:
            attrs["parameters"] = dict(attrs["parameters"] or {})
        else:  # a subclass of a user app keeps its parent's parameter declarations
            inherited = next((b.parameters for b in bases if isinstance(getattr(b, "parameters", None), dict)), {})
            attrs["parameters"] = {k: dict(v) for k, v in inherited.items()}
        cls = super().__new__(mcls, name, bases, attrs)
        if not any(isinstance(b, ApplicationDefinitionMeta) for b in bases):
            return cls  # the ApplicationDefinition base itself
        if "site" not in attrs and not any(getattr(b, "site", None) is not None for b in bases):
            raise AttributeError(f"ApplicationDefinition {name} must set `site` (a site name, id or Site object)")
        template = attrs.get("command_template", getattr(cls, "command_template", None))
        run = attrs.get("run", getattr(cls, "run", None))
        has_template = isinstance(template, str)
        has_run = callable(run)
        if has_template and has_run:
            raise AttributeError(f"ApplicationDefinition {name} must not define both `run` and `command_template`")
        if has_template:
            mcls._setup_shell_app(cls)
        elif has_run:
            mcls._setup_py_app(cls)
        else:
            raise AttributeError(f"ApplicationDefinition {name} must define a `command_template` or a `run(self, ...)` method")
        for attr, kind in (("transfers", dict), ("environment_variables", dict), ("cleanup_files", (list, tuple))):
            if not isinstance(getattr(cls, attr), kind):
                raise AttributeError(f"ApplicationDefinition {name}.{attr} must be a {getattr(kind, '__name__', 'list')}")
        cls.__app_id__ = attrs.get("__app_id__")
        cls._site_id = attrs.get("_site_id")
        return cls

    def _setup_shell_app(cls) -> None:
        name = cls.__name__
        cls._app_type = AppType.SHELL_CMD
        cls.command_template = cls.command_template.strip()
        for var in _TEMPLATE_VAR.findall(cls.command_template):
            expr = var.strip().split("|")[0].strip()
            if not expr.isidentifier():
                raise AttributeError(f"ApplicationDefinition {name}: template parameter {{{{{var}}}}} must be a Python identifier")
        params = {k: _check_dict_param(name, k, v) for k, v in cls.parameters.items()}
        detected = template_variables(cls.command_template)
        extraneous = set(params) - detected
        if extraneous:
            raise AttributeError(
                f"ApplicationDefinition {name}: parameters {sorted(extraneous)} do not appear in command_template "
                f"(template uses: {sorted(detected)})"
            )
        for var in sorted(detected - set(params)):
            params[var] = {"required": True, "default": None, "help": ""}
        cls.parameters = params
        cls._default_params = {k: v["default"] for k, v in params.items() if not v["required"]}

    def _setup_py_app(cls) -> None:
        cls._app_type = AppType.PY_FUNC
        signature = inspect.signature(cls.run)
        if "self" not in signature.parameters:
            raise TypeError(f"ApplicationDefinition {cls.__name__}.run{signature} must take `self` first")
        cls.parameters = {
            pname: _param_from_signature(p)
            for pname, p in signature.parameters.items()
            if pname != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        cls._default_params = {k: v["default"] for k, v in cls.parameters.items() if not v["required"]}
        cls._accepts_any_params = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())

    @property
    def source_code(cls) -> str:
        """The class's source: read from its file, or for a class loaded from the API (whose file
        is elsewhere: ``load_by_site()``, ``from_serialized()``) the source stored with it."""
        loaded = cls.__dict__.get("_source_code")
        if loaded is not None:
            # Stored empty (synced from ``python -c``, a REPL): looking it up by name would find
            # a local class of the same name and give its source (and sync() would store it).
            return loaded
        return codec.get_source(cls)


class ApplicationDefinition(metaclass=ApplicationDefinitionMeta):
    """Base class of user apps. See docs/api.md."""

    site: ClassVar[Union[int, str, "Site", None]] = None
    command_template: ClassVar[Optional[str]] = None
    run: ClassVar[Optional[Callable[..., Any]]] = None
    parameters: ClassVar[dict[str, Any]] = {}
    transfers: ClassVar[dict[str, Any]] = {}
    environment_variables: ClassVar[dict[str, str]] = {}
    cleanup_files: ClassVar[list[str]] = []
    python_exe: ClassVar[str] = sys.executable
    ARG_CHUNK_SIZE: ClassVar[int] = ARG_CHUNK_SIZE

    __app_id__: ClassVar[Optional[int]] = None
    _site_id: ClassVar[Optional[int]] = None
    _app_type: ClassVar[AppType]
    _default_params: ClassVar[dict[str, Any]] = {}
    #: run(self, **kwargs) apps take any parameter
    _accepts_any_params: ClassVar[bool] = False
    _serialized_class: ClassVar[Optional[str]] = None
    #: the source stored in the App record this class was loaded from (None: not loaded)
    _source_code: ClassVar[Optional[str]] = None
    #: client used by sync()/load_*; None = the balsam.api default client
    _client: ClassVar[Any] = None
    #: loaded classes by (server URL, app id) and (server URL, site name, app name)
    _app_id_cache: ClassVar[dict[tuple[str, int], type]] = {}
    #: App records fetched ahead (:meth:`prefetch_site`), deserialized when first loaded by id.
    _app_record_cache: ClassVar[dict[tuple[str, int], Any]] = {}
    _app_name_cache: ClassVar[dict[tuple[str, Optional[str], str], type]] = {}

    class ModuleLoadError(Exception):
        pass

    def __init__(self, job: "Job") -> None:
        self.job = job

    # ------------------------------------------------------------------ command line
    def get_arg_str(self) -> str:
        """The shell command of this job (template rendered, or the Python runner command)."""
        if self._app_type == AppType.SHELL_CMD:
            return self._render_shell_command()
        return python_runner_command(type(self), self.job)

    def _render_shell_command(self) -> str:
        values = {**self._default_params, **self.job.get_parameters()}
        missing = sorted(set(self.parameters) - set(values))
        if missing:
            raise ValueError(f"{type(self).__name__}: job {self.job.id} is missing required parameters {missing}")
        quoted = {k: shlex.quote(str(values[k])) for k in self.parameters}
        plain = _plain_template(self.command_template)
        if plain is not None and all(name in quoted for name in plain[1::2]):
            return "".join(quoted[part] if i % 2 else part for i, part in enumerate(plain))
        return _compiled_template(self.command_template).render(quoted)

    def get_environ_vars(self) -> dict[str, str]:
        env = _environ_copy()
        env.update({str(k): str(v) for k, v in self.environment_variables.items()})
        env["BALSAM_JOB_ID"] = str(self.job.id)
        # Always exported (as Balsam 0.7 does): inherited or unset, OpenMP would take every core.
        # The app's own environment_variables win.
        if "OMP_NUM_THREADS" not in self.environment_variables:
            env["OMP_NUM_THREADS"] = str(max(1, int(self.job.threads_per_rank or 1)))
        return env

    # ------------------------------------------------------------------ hooks (defaults of Balsam 0.7)
    def preprocess(self) -> None:
        self.job.state = JobState.preprocessed

    def postprocess(self) -> None:
        self.job.state = JobState.postprocessed

    def handle_timeout(self) -> None:
        self.job.state = JobState.restart_ready

    def handle_error(self) -> None:
        self.job.state = JobState.failed

    def shell_preamble(self) -> Union[str, list[str]]:
        return []

    # ------------------------------------------------------------------ API models
    @classmethod
    def _models(cls) -> Any:
        """An object with the model classes (``.App``, ``.Site``) for the app's client."""
        if cls._client is not None:
            return cls._client
        from . import models

        return models

    @staticmethod
    def _set_client(client: Any) -> None:
        ApplicationDefinition._client = client

    @classmethod
    def resolve_site_id(cls) -> int:
        if cls._site_id is not None:
            return cls._site_id
        from .models import Site

        site = cls.site
        if isinstance(site, bool) or site is None:
            raise ValueError(f"{cls.__name__}.site must be a site name, id or Site object")
        if isinstance(site, int):
            cls._site_id = site
        elif isinstance(site, str):
            SiteModel = cls._models().Site
            try:
                cls._site_id = SiteModel.objects.get(name=site).id
            except SiteModel.DoesNotExist:
                raise _either(SiteModel.DoesNotExist, f"{cls.__name__}.site: no site named {site!r} (see `balsam site ls`)") from None
        elif isinstance(site, Site):
            if site.id is None:
                raise ValueError(f"{cls.__name__}.site has no id (save the Site first)")
            cls._site_id = site.id
        else:
            raise ValueError(f"{cls.__name__}.site must be a site name, id or Site object, got {type(site).__name__}")
        return cls._site_id  # type: ignore[return-value]

    @classmethod
    def to_dict(cls) -> dict[str, Any]:
        serialized = _serialize_class(cls)
        cls._serialized_class = serialized
        try:
            source = cls.source_code  # type: ignore[attr-defined]
        except (OSError, TypeError):
            # Defined interactively: no source file (sync() then keeps a stored source, never
            # replaces it with "").
            source = ""
        return {
            "site_id": cls.resolve_site_id(),
            "name": cls.__name__,
            "serialized_class": serialized,
            "source_code": source,
            "description": (cls.__doc__ or "").strip(),
            "parameters": {k: _wire_param(v) for k, v in cls.parameters.items()},
            "transfers": {k: _wire_transfer(cls.__name__, k, v) for k, v in cls.transfers.items()},
        }

    @classmethod
    def sync(cls, rename_from: Optional[str] = None) -> None:
        """Create or update the App record of this class at its site (keyed by site and class name).

        Nothing is sent when the stored record is already this class (libEnsemble syncs before
        every submit); a record created meanwhile by another process is updated, not refused."""
        # Here, not at the top: a run() job's start-up imports this module, never the client.
        from balsam.client.rest import APIError

        from .models import forget_app_name

        AppModel = cls._models().App
        record = cls.to_dict()
        existing = None
        lookup_name = rename_from or record["name"]
        try:
            existing = AppModel.objects.get(site_id=record["site_id"], name=lookup_name)
        except AppModel.DoesNotExist:
            if rename_from:
                raise ValueError(f"cannot rename: no app named {rename_from!r} at site {record['site_id']}") from None
        if existing is None:
            try:
                existing = AppModel.objects.create(**record)
                logger.info("Created App(id=%s, name=%s)", existing.id, existing.name)
            except APIError as exc:
                if exc.status_code != 409:
                    raise
                # Created since our look-up (concurrent first syncs: several workers, threads):
                # that record is this app's, brought up to date below.
                existing = AppModel.objects.get(site_id=record["site_id"], name=record["name"])
        changed = _update_app(existing, record)
        if changed:
            logger.info("Updated App(id=%s, name=%s): %s", existing.id, existing.name, ", ".join(changed))
        cls.__app_id__ = existing.id
        server = _server_key(AppModel)
        ApplicationDefinition._app_id_cache[(server, existing.id)] = cls
        # Job(app_id="Name") keeps the id of each name: this one may have changed (the app was
        # deleted and synced again) or been renamed.
        forget_app_name(server, record["name"])
        if rename_from:
            forget_app_name(server, rename_from)

    @classmethod
    def submit(
        cls,
        workdir: Union[str, Path],
        tags: Optional[dict[str, str]] = None,
        data: Optional[dict[str, Any]] = None,
        return_code: Optional[int] = None,
        num_nodes: int = 1,
        ranks_per_node: int = 1,
        threads_per_rank: int = 1,
        threads_per_core: int = 1,
        launch_params: Optional[dict[str, str]] = None,
        gpus_per_rank: float = 0,
        node_packing_count: int = 1,
        wall_time_min: int = 0,
        parent_ids: Optional[set[int]] = None,
        transfers: Optional[dict[str, Any]] = None,
        save: bool = True,
        **app_params: Any,
    ) -> "Job":
        """A Job of this app (saved unless ``save=False``: then pass it to ``Job.objects.bulk_create``).

        Keyword arguments that are not Job fields become the app's parameters.
        """
        if codec.app_id_of(cls) is None:
            cls.sync()
        app_id = codec.app_id_of(cls)
        unknown = sorted(set(app_params) - set(cls.parameters))
        if unknown and not cls._accepts_any_params:
            if cls._app_type == AppType.PY_FUNC:
                # run() would fail with a TypeError on the compute node (as in Balsam 0.7): say it now.
                raise TypeError(f"{cls.__name__}.submit() got unknown app parameters {unknown} "
                                f"(run() takes: {sorted(cls.parameters)})")
            # A command template renders only its own parameters; Balsam 0.7 stored the others with the
            # job and ignored them (libEnsemble passes a whole app_args dict): kept, said once.
            key = (cls, tuple(unknown))
            if key not in _WARNED_UNUSED_PARAMS:
                _WARNED_UNUSED_PARAMS.add(key)
                logger.warning("%s.submit(): parameters %s are not in its command template (parameters: %s): "
                               "stored with the job, not rendered", cls.__name__, unknown, sorted(cls.parameters))
        missing = sorted(k for k, v in cls.parameters.items() if v.get("required") and k not in app_params)
        if missing and cls.preprocess is ApplicationDefinition.preprocess:
            # Created, as in Balsam 0.7 (a preprocess() hook may set them: no warning for an app
            # with its own), but otherwise the job fails only when a launcher renders it, maybe
            # hours later in a queue: said now, once.
            key = (cls, ("<missing>", *missing))
            if key not in _WARNED_UNUSED_PARAMS:
                _WARNED_UNUSED_PARAMS.add(key)
                logger.warning("%s.submit(): required parameters %s not given: the job fails when it is launched "
                               "unless its preprocess() sets them", cls.__name__, missing)
        JobModel = cls._client.Job if cls._client is not None else _job_model()
        job = JobModel(
            workdir=workdir, app_id=app_id, tags=tags, data=data, return_code=return_code, num_nodes=num_nodes,
            ranks_per_node=ranks_per_node, threads_per_rank=threads_per_rank, threads_per_core=threads_per_core,
            launch_params=launch_params, gpus_per_rank=gpus_per_rank, node_packing_count=node_packing_count,
            wall_time_min=wall_time_min, parent_ids=parent_ids, transfers=transfers, parameters=app_params,
        )
        if save:
            job.save()
        return job

    # ------------------------------------------------------------------ loading
    @staticmethod
    def from_serialized(app: "App | dict[str, Any]") -> type["ApplicationDefinition"]:
        """The ApplicationDefinition class stored in an App record (an App object or its JSON dict)."""
        if isinstance(app, dict):
            from .models import App

            # A record of some fields only (the site agent's hook workers get no source) is fine.
            stored_source = app.get("source_code")
            app = App._from_api(app)
        else:
            stored_source = app.source_code
        if app.id is None:
            raise ValueError("cannot load an App that has no id")
        cls = codec.deserialize_app_class(app.serialized_class, name=app.name, app_id=app.id)
        if not (isinstance(cls, type) and issubclass(cls, ApplicationDefinition)):
            raise TypeError(f"App(id={app.id}, name={app.name}) does not hold an ApplicationDefinition subclass")
        cls.__app_id__ = app.id
        cls._serialized_class = app.serialized_class
        # Its file is not here: sync() of the loaded class keeps this source (0.7 raised OSError).
        cls._source_code = stored_source
        if getattr(cls, "_site_id", None) is None:
            cls._site_id = app.site_id
        return cls

    @staticmethod
    def load_by_site(site: Union[int, str, "Site"]) -> dict[str, type["ApplicationDefinition"]]:
        """``{name: class}`` of every app at a site (name, id or Site object)."""
        from .models import Site

        AppModel = ApplicationDefinition._models().App
        if isinstance(site, int) and not isinstance(site, bool):
            lookup: dict[str, Any] = {"site_id": site}
        elif isinstance(site, str):
            lookup = {"site_name": site}
        elif isinstance(site, Site):
            lookup = {"site_id": site.id}
        else:
            raise ValueError("site must be a site id, name or Site object")
        apps = {}
        for app in AppModel.objects.filter(**lookup):
            cls = ApplicationDefinition.from_serialized(app)
            ApplicationDefinition._app_id_cache[(_server_key(AppModel), app.id)] = cls
            apps[app.name] = cls
        return apps

    @classmethod
    def load_by_name(cls, app_name: str, site_name: Optional[str] = None) -> type["ApplicationDefinition"]:
        AppModel = cls._models().App
        key = (_server_key(AppModel), site_name, app_name)
        if key not in ApplicationDefinition._app_name_cache:
            lookup: dict[str, Any] = {"name": app_name}
            if site_name:
                lookup["site_name"] = site_name
            try:
                app = AppModel.objects.get(**lookup)
            except AppModel.MultipleObjectsReturned:
                raise _either(AppModel.MultipleObjectsReturned, f"several sites have an app named {app_name!r}: pass site_name") from None
            loaded = cls.from_serialized(app)
            ApplicationDefinition._app_name_cache[key] = loaded
            ApplicationDefinition._app_id_cache[(_server_key(AppModel), app.id)] = loaded
        return ApplicationDefinition._app_name_cache[key]

    @classmethod
    def load_by_id(cls, app_id: int) -> type["ApplicationDefinition"]:
        """The class of App ``app_id``, read once per process and then kept: a re-sync of the app
        elsewhere is seen after :meth:`reload` or :meth:`clear_cache` (launchers re-read theirs)."""
        return cls._load_by_id_with(cls._models().App, app_id)

    @classmethod
    def reload(cls, app: "App | dict[str, Any]") -> type["ApplicationDefinition"]:
        """The class stored in an App record just read, which :meth:`load_by_id` of its id returns
        from then on in this process (a running launcher's copy of a re-synced app is replaced so)."""
        loaded = ApplicationDefinition.from_serialized(app)
        key = (_server_key(cls._models().App), loaded.__app_id__)
        ApplicationDefinition._app_record_cache.pop(key, None)
        ApplicationDefinition._app_id_cache[key] = loaded
        return loaded

    @staticmethod
    def _load_by_id_with(AppModel: Any, app_id: int) -> type["ApplicationDefinition"]:
        key = (_server_key(AppModel), app_id)
        if key not in ApplicationDefinition._app_id_cache:
            app = ApplicationDefinition._app_record_cache.pop(key, None)
            if app is None:
                app = AppModel.objects.get(id=app_id)
            ApplicationDefinition._app_id_cache[key] = ApplicationDefinition.from_serialized(app)
        return ApplicationDefinition._app_id_cache[key]

    @classmethod
    def prefetch_site(cls, site_id: int, limit: int = 32) -> int:
        """Fetch up to ``limit`` App records of a site in one request, so that :meth:`load_by_id`
        of any of them makes no round trip; returns how many were fetched.

        Only the records are kept: a class is deserialized when it is loaded (an app that cannot
        load here fails then, for the jobs that use it, as without the prefetch). A launcher calls
        this while its first acquire is in flight: the app of its first job then needs no request
        after the acquire's answer."""
        AppModel = cls._models().App
        server = _server_key(AppModel)
        records = list(AppModel.objects.filter(site_id=int(site_id))[: max(0, int(limit))])
        for app in records:
            key = (server, app.id)
            if key not in ApplicationDefinition._app_id_cache:
                ApplicationDefinition._app_record_cache[key] = app
        if any(app.serialized_class for app in records):
            codec.warm_up()  # its import here, not on the first job's path
        return len(records)

    @classmethod
    def clear_cache(cls) -> None:
        ApplicationDefinition._app_id_cache.clear()
        ApplicationDefinition._app_name_cache.clear()
        ApplicationDefinition._app_record_cache.clear()


#: Class attributes that are this client's state, not the app's: never in its serialized payload.
_CLIENT_STATE = ("__app_id__", "_site_id", "_serialized_class", "_source_code")


def _serialize_class(cls: type[ApplicationDefinition]) -> str:
    return codec.serialize_app_class(cls, root=ApplicationDefinition, without=_CLIENT_STATE)


def _update_app(existing: "App", record: dict[str, Any]) -> list[str]:
    """Save the fields of ``record`` that differ from the stored App; returns their names. Compared
    in wire form (the stored parameters are AppParameter records, the class's are dicts)."""
    changed = []
    for key, value in record.items():
        if key == "source_code" and not value:
            continue  # the source could not be read here: the stored one stays
        if key != "site_id" and existing._field_json(key) != value:
            setattr(existing, key, value)
            changed.append(key)
    if changed:
        existing.save()
    return changed


def _server_key(model: Any) -> str:
    """Cache key part: app ids are unique per server, not across servers."""
    return model._get_client().api_root


def _job_model() -> Any:
    from .models import Job

    return Job


def _wire_param(param: dict[str, Any]) -> dict[str, Any]:
    default = param.get("default")
    if default is not None and not isinstance(default, str):
        default = str(default)
    return {"required": bool(param["required"]), "default": default, "help": str(param.get("help") or "")}


def _wire_transfer(app: str, slot: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise AttributeError(f"ApplicationDefinition {app}: transfer slot {slot!r} must be a dict")
    direction = spec.get("direction")
    direction = getattr(direction, "value", direction)
    if direction not in ("in", "out"):
        raise AttributeError(f"ApplicationDefinition {app}: transfer slot {slot!r} needs direction 'in' or 'out'")
    if "local_path" not in spec:
        raise AttributeError(f"ApplicationDefinition {app}: transfer slot {slot!r} needs a local_path")
    return {
        "required": bool(spec.get("required", False)),
        "direction": direction,
        "local_path": str(spec["local_path"]),
        "description": str(spec.get("description", "")),
        "recursive": bool(spec.get("recursive", False)),
    }


# ====================================================================================== run() apps
@functools.lru_cache(maxsize=256)
def _compiled_template(command_template: str) -> Any:
    """Compile each command template once: launchers render it for thousands of jobs per second
    (compiling costs ~0.3 ms, rendering a compiled template ~10 us)."""
    # Only templates with Jinja2 markup beyond {{ name }} get here (a ~40 ms import).
    import jinja2

    return jinja2.Template(command_template)


def _chunk(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def python_runner_command(app_cls: type[ApplicationDefinition], job: "Job") -> str:
    """The shell command that runs ``app_cls.run(**job parameters)`` for ``job``.

    ``<python_exe> -m balsam._api.python_runner <app_id> <n_app_chunks> <app chunks...> <job chunks...>``
    (chunks of 128,000 characters, shell-quoted) so no file needs to be shared with the node.
    A ``python_exe`` other than this Python (the default: the launcher's own, which has Balsam)
    starts with ``<python_exe> -c '<RUNNER_BOOTSTRAP>'`` instead of ``-m balsam._api.python_runner``
    (the same argv after it, which the runner reads alike): where that Python has no Balsam, the
    job ends with the runner's one line and exit status 78, not Python's "No module named 'balsam'"
    and 1, which serial mode relaunched 3 times (:data:`RUNNER_BOOTSTRAP`). Its Python code makes
    the line one for bash (as a raw job's braces already do), never exec'd as its words: over
    128 KiB it runs from a script file (:func:`balsam.launcher.app_run.shell_argv`).
    The job chunks are its JSON, as runners of every version read it, when the line stays under
    :data:`RAW_JOB_LINE_MAX_BYTES`: the JSON's braces and quotes make the line go through
    ``bash -c`` as ONE argument, which Linux caps at 128 KiB (MAX_ARG_STRLEN). A longer line
    carries the base64 of the JSON instead (a job with a parameter of ~100,000 characters never
    started: "Argument list too long"): plain words, which the launchers exec as they are
    (:func:`balsam.launcher.app_run.direct_argv`), each chunk one argument. Only a runner that
    reads base64 (``python_exe``'s Balsam from this one on) runs such a job; raw for every job,
    an older runner under ``python_exe`` failed them all.
    """
    app_id = codec.app_id_of(app_cls)
    if app_id is None:
        raise ValueError(f"{app_cls.__name__} has no app id: load it from the API or sync() it")
    payload = app_cls._serialized_class or _serialize_class(app_cls)
    app_chunks = _chunk(payload, app_cls.ARG_CHUNK_SIZE)
    python_exe = app_cls.python_exe
    start = f"-m {RUNNER_MODULE}" if python_exe == sys.executable else f"-c {_RUNNER_BOOTSTRAP_WORD}"
    head = f"{python_exe_words(python_exe)} {start} "
    job_json = json.dumps(_job_json(job))
    line = _runner_line(head, app_id, app_chunks, _chunk(job_json, app_cls.ARG_CHUNK_SIZE))
    if len(line) * 4 < RAW_JOB_LINE_MAX_BYTES or len(line.encode("utf-8", "surrogateescape")) < RAW_JOB_LINE_MAX_BYTES:
        return line
    job_text = base64.b64encode(job_json.encode("ascii")).decode("ascii")
    return _runner_line(head, app_id, app_chunks, _chunk(job_text, app_cls.ARG_CHUNK_SIZE))


def python_exe_words(python_exe: str) -> str:
    """``python_exe`` as the runner line starts with it: as written, shell words, as Balsam 0.7
    put it (``apptainer exec image.sif python3``, ``conda run -n env python``,
    ``$CONDA_PREFIX/bin/python``, ``python3 -u``: quoted as one word, each was "No such file or
    directory"); quoted when it names an existing file (a path with a space, which 0.7 split). A
    plain path needs neither, and costs no file system call."""
    quoted = shlex.quote(str(python_exe))
    if quoted == python_exe or os.path.exists(python_exe):
        return quoted
    return str(python_exe)


def _runner_line(head: str, app_id: int, app_chunks: list[str], job_chunks: list[str]) -> str:
    args = [str(app_id), str(len(app_chunks)), *app_chunks, *job_chunks]
    return head + " ".join(shlex.quote(a) for a in args)


def _job_json(job: "Job") -> dict[str, Any]:
    from balsam.serialization import converter

    data = converter.unstructure(job._record, type(job._record))
    # The runner never reads an earlier run's result: shipped, a re-run (RESTART_READY) of a job
    # whose first run returned ~100 KB put that on its command line too, and could fail to start.
    data.pop("serialized_return_value", None)
    data.pop("serialized_exception", None)
    return data


def parse_run_markers(job_out_text: str) -> tuple[Optional[str], Optional[str]]:
    """Find the run() result in a job's output: ``(serialized_return_value, serialized_exception)``.

    The runner prints ``BALSAM-RETURN-VALUE <b64>`` or ``BALSAM-EXCEPTION <b64>`` on a line of its
    own; the last such line wins. Either item is None when absent. The site agent's scanner
    (:class:`balsam._api.run_markers.MarkerScan`, which reads job.out in chunks) run over the
    text's UTF-8 bytes, so both read a line the same way: lines end at ``\n`` only, ASCII blanks
    are stripped (see :mod:`balsam._api.run_markers`).
    """
    return scan_run_markers(job_out_text.encode("utf-8", "surrogatepass"))
