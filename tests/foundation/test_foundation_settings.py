"""settings.yml: schema coverage, one-line located errors, rendering, SiteConfig."""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path

import attrs
import pytest
import yaml

from balsam.config import (
    AllowedQueue,
    Settings,
    SettingsError,
    SiteConfig,
    SiteNotFoundError,
    balsam_home,
    load_settings,
    loads_settings,
    render_sample_settings,
    render_settings_yaml,
    section_specs,
)
from balsam.config.schema import LoggingSettings
from balsam.util import log_file_handler

from foundation_helpers import run_balsam

BAD_QUEUE = textwrap.dedent(
    """\
    logging:
      level: INFO
    filter_tags: {}
    launcher:
      platform: default
      idle_ttl_sec: 60
    scheduler:
      name: local
      sync_period: 10
      allowed_projects: [local]
      allowed_queues:
        local: {max_nodes: 1, max_walltime: 60, max_queued_jobs: 5}
        debug:
          max_nodes: two
          max_walltime: 60
          max_queued_jobs: 1
    """
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.yml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(text: str) -> str:
    with pytest.raises(SettingsError) as info:
        loads_settings(textwrap.dedent(text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_value_names_file_line_key_and_problem(tmp_path):
    path = write(tmp_path, BAD_QUEUE)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}:14 scheduler.allowed_queues.debug.max_nodes: expected an integer, got 'two'"


def test_a_driver_options_attrs_validator_is_a_settings_error_on_its_line():
    # attrs' own validators (in_, ge) raised a bare ValueError out of the loader: a traceback
    # instead of the key's file and line.
    assert error_of("""\
        scheduler:
          name: slurm
          options:
            queue_flag: -p
        """) == "settings.yml:4 scheduler.options.queue_flag: 'queue_flag' must be in ('--partition', '--qos') (got '-p')"
    assert error_of("""\
        scheduler:
          name: slurm
          options:
            unlimited_window_min: 0
        """) == "settings.yml:4 scheduler.options.unlimited_window_min: must be at least 1, got 0"


def test_bad_settings_file_gives_one_error_line_on_the_cli(tmp_path):
    path = write(tmp_path, BAD_QUEUE)
    result = run_balsam("site", "check-settings", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: {path}:14 scheduler.allowed_queues.debug.max_nodes: expected an integer, got 'two'\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("launcher:\n  idle_ttl: 5\n", "settings.yml:2 launcher.idle_ttl: unknown key (did you mean 'idle_ttl_sec'?)"),
        ("schedular:\n  name: local\n",
         "settings.yml:1 schedular: no installed agent module consumes this section (did you mean 'scheduler'? If "
         "not, install the distribution that provides the 'schedular' agent module, or set it to null)"),
        ("launcher:\n  zzz: 1\n", "settings.yml:2 launcher.zzz: unknown key (known keys: platform, platform_options, "
         "idle_ttl_sec, delay_sec, error_tail_num_lines, max_concurrent_mpiruns, mpi_drain_for_large_jobs_sec, "
         "mpirun_allows_node_packing, "
         "serial_mode_prefetch_per_rank, sort_by, serial_mode_startup_params, default_postprocess_in_launcher)"),
        ("globus_extra: {}\n",
         "settings.yml:1 globus_extra: no installed agent module consumes this section (install the distribution "
         "that provides the 'globus_extra' agent module, or set it to null)"),
        (
            "scheduler:\n  allowed_queues:\n    q: {max_nodes: 1, max_walltime: 2, max_queued_job: 3}\n",
            "settings.yml:3 scheduler.allowed_queues.q.max_queued_job: unknown key (did you mean 'max_queued_jobs'?)",
        ),
    ],
)
def test_unknown_keys_are_errors_with_suggestions(text, expected):
    assert error_of(text) == expected


def test_retired_class_path_keys_point_to_plugin_names():
    message = error_of("scheduler:\n  scheduler_class: balsam.platform.scheduler.SlurmScheduler\n")
    assert message.startswith("settings.yml:2 scheduler.scheduler_class: unknown key: replaced by scheduler.name")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("logging:\n  flush_period: soon\n", "settings.yml:2 logging.flush_period: expected an integer, got 'soon'"),
        ("launcher:\n  mpirun_allows_node_packing: maybe\n",
         "settings.yml:2 launcher.mpirun_allows_node_packing: expected true or false, got 'maybe'"),
        ("filter_tags: [a, b]\n", "settings.yml:1 filter_tags: expected a mapping, got a list"),
        ("scheduler: 3\n", "settings.yml:1 scheduler: expected a mapping of SchedulerSettings keys, got 3"),
        ("scheduler:\n  allowed_projects:\n    - ok\n    - [nested]\n",
         "settings.yml:4 scheduler.allowed_projects[1]: expected a string, got a list"),
        ("scheduler:\n  allowed_queues:\n    q: {max_nodes: 1, max_walltime: 2}\n",
         "settings.yml:3 scheduler.allowed_queues.q: missing required key 'max_queued_jobs'"),
        ("queue_maintainer:\n  job_mode: mixed\n",
         "settings.yml:2 queue_maintainer.job_mode: expected 'mpi' or 'serial', got 'mixed'"),
        ("scheduler:\n  options: {queue_flag: --qos}\n",
         "settings.yml:2 scheduler.options.queue_flag: unknown option (scheduler 'local' takes no options)"),
        ("launcher:\n  platform_options: [1]\n",
         "settings.yml:2 launcher.platform_options: expected a mapping of NoOptions keys, got a list"),
        ("logging:\n  buffer_num_records: -1\n",
         "settings.yml:2 logging.buffer_num_records: must not be negative, got -1"),
        ("logging:\n  level: LOUD\n",
         "settings.yml:2 logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
        ("logging: null\n", "settings.yml:1 logging: this section cannot be null (remove the key to use the defaults)"),
        ("- 1\n", "settings.yml:1 (top level): expected a mapping of sections, got a list"),
        ("launcher:\n  platform: nowhere\n", "settings.yml:2 launcher.platform: unknown platform 'nowhere' (available: "),
        ("scheduler:\n  name: lokal\n", "settings.yml:2 scheduler.name: unknown scheduler 'lokal' (available: "),
    ],
)
def test_type_and_value_errors(text, expected):
    assert error_of(text).startswith(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("scheduler: {}\nqueue_maintainer:\n  submit_queue: debug\n",
         "settings.yml:3 queue_maintainer.submit_queue: the scheduler section refuses its BatchJobs: queue 'debug' is "
         "not in the site's allowed_queues (local)"),
        ("scheduler: {}\nqueue_maintainer:\n  num_nodes: 2\n",
         "settings.yml:3 queue_maintainer.num_nodes: the scheduler section refuses its BatchJobs: num_nodes 2 is outside"),
        ("scheduler:\n  allowed_projects: [m1]\nqueue_maintainer:\n  submit_project: m2\n",
         "settings.yml:4 queue_maintainer.submit_project: the scheduler section refuses its BatchJobs: project 'm2'"),
    ],
)
def test_a_queue_maintainer_the_scheduler_section_refuses_is_an_error(text, expected):
    """It posted a BatchJob the site refuses every cycle (1,440 failed BatchJobs a day)."""
    assert error_of(text).startswith(expected)


def test_a_queue_maintainer_that_submits_nothing_is_not_checked_against_the_scheduler():
    from balsam.config.settings import parse_settings

    parse_settings(yaml.safe_load("scheduler: {}\nqueue_maintainer:\n  submit_queue: debug\n  num_queued_jobs: 0\n"))
    parse_settings(yaml.safe_load("scheduler: {}\nqueue_maintainer: {}\n"))  # the defaults fit the default scheduler section


def test_yaml_syntax_error_names_the_line():
    assert error_of("logging:\n  level: INFO\n  format: [unclosed\n").startswith("settings.yml:4: invalid YAML:")
    # A document libyaml refuses is read again by the pure-Python loader, whose message is the one shown.
    assert error_of("logging:\n\tlevel: INFO\n") == \
        "settings.yml:2: invalid YAML: found character '\\t' that cannot start any token"
    assert error_of("launcher: x: 1\n") == "settings.yml:1: invalid YAML: mapping values are not allowed here"


def test_the_fast_yaml_loader_reads_what_the_pure_python_one_reads(monkeypatch):
    from balsam.config import settings as settings_module

    text = (settings_module.render_sample_settings()
            + "filter_tags: {system: H2O, n: '3'}\nextra: [1, 2.5, null, true, 2026-12-02, 'x: y']\n")
    assert yaml.load(text, Loader=settings_module._FAST_YAML_LOADER) == yaml.safe_load(text)
    fast_lines = settings_module._line_map(text)
    monkeypatch.setattr(settings_module, "_FAST_YAML_LOADER", yaml.SafeLoader)
    assert fast_lines == settings_module._line_map(text) and len(fast_lines) > 50


def test_several_problems_are_counted_and_all_kept():
    with pytest.raises(SettingsError) as info:
        loads_settings("logging:\n  flush_period: x\nlauncher:\n  delay_sec: y\n")
    assert str(info.value).endswith("(and 1 more problem)")
    assert info.value.errors == [
        "settings.yml:2 logging.flush_period: expected an integer, got 'x'",
        "settings.yml:4 launcher.delay_sec: expected an integer, got 'y'",
    ]


@pytest.mark.parametrize("text, expected", [
    # A queue whose limits refuse every BatchJob, or hold every one back, is refused with its line.
    ("scheduler:\n  allowed_queues:\n    q:\n      max_nodes: 0\n      max_walltime: 30\n      max_queued_jobs: 1\n",
     ["settings.yml:4 scheduler.allowed_queues.q.max_nodes: must be at least 1, got 0"]),
    ("scheduler:\n  allowed_queues:\n    q: {max_nodes: 2, max_walltime: -3, max_queued_jobs: -1}\n",
     ["settings.yml:3 scheduler.allowed_queues.q.max_walltime: must be at least 1, got -3",
      "settings.yml:3 scheduler.allowed_queues.q.max_queued_jobs: must not be negative (0: no limit), got -1"]),
    ("launcher:\n  idle_ttl_sec: -5\n  delay_sec: -1\n  error_tail_num_lines: -2\n",
     ["settings.yml:2 launcher.idle_ttl_sec: must not be negative, got -5",
      "settings.yml:3 launcher.delay_sec: must be at least 1, got -1",
      "settings.yml:4 launcher.error_tail_num_lines: must not be negative, got -2"]),
    ("launcher:\n  delay_sec: 0\n", ["settings.yml:2 launcher.delay_sec: must be at least 1, got 0"]),
])
def test_limits_that_make_the_site_unusable_are_refused_with_their_line(text, expected):
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    assert sorted(info.value.errors) == sorted(expected)


def test_the_lowest_usable_limits_are_accepted():
    settings = loads_settings("launcher: {idle_ttl_sec: 0, delay_sec: 1, error_tail_num_lines: 0}\n"
                              "scheduler:\n  allowed_queues:\n    q: {max_nodes: 1, max_walltime: 1, max_queued_jobs: 0}\n")
    assert settings.launcher.idle_ttl_sec == 0 and settings.scheduler.allowed_queues["q"].max_queued_jobs == 0


def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = tmp_path / "settings.yml"
    path.write_bytes(b"logging:\n  level: INFO\nfilter_tags: {a: \"\xff\"}\n")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert info.value.errors == [f"{path}:3: not UTF-8 text (byte 42: 0xff)"]
    result = run_balsam("site", "check-settings", str(path))
    assert result.returncode == 1 and result.stderr == f"Error: {path}:3: not UTF-8 text (byte 42: 0xff)\n"


@pytest.mark.parametrize("text, expected", [
    ("a: &x [*x]\n", "settings.yml:1: invalid YAML: a[0] is an alias of a node that contains it (data that contains itself)"),
    ("launcher:\n  platform_options: &x {b: *x}\n",
     "settings.yml:2: invalid YAML: launcher.platform_options.b is an alias of a node that contains it (data that contains itself)"),
])
def test_a_self_referencing_alias_is_one_line(text, expected):
    # It recursed in the line map until "maximum recursion depth exceeded".
    assert error_of(text) == expected


def test_aliases_used_twice_are_read_and_their_problems_located():
    settings = loads_settings("filter_tags: &t {a: '1'}\nlauncher:\n  serial_mode_startup_params: *t\n")
    assert settings.launcher.serial_mode_startup_params == {"a": "1"}
    # Nested aliases: each node is walked once (a "billion laughs" document used to take exponential time).
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(6))
    from balsam.config.settings import _line_map

    # No clock here (no timed assertions): walked per use, this document is 10^7 nodes and the
    # test would not end.
    assert _line_map(laughs)[("g",)] == 7
    message = error_of("scheduler:\n  allowed_queues:\n    debug: &q {max_nodes: 0, max_walltime: 5, max_queued_jobs: 1}\n"
                       "    prod: *q\n")
    assert message.startswith("settings.yml:3 scheduler.allowed_queues.debug.max_nodes: must be at least 1, got 0")
    assert message.endswith("(and 1 more problem)")


def test_check_settings_of_a_missing_yml_file_says_file_not_found(tmp_path):
    result = run_balsam("site", "check-settings", "missing.yml", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == "Error: missing.yml: file not found\n"
    result = run_balsam("site", "check-settings", "no-such-dir", cwd=tmp_path)  # still a site directory
    assert result.returncode == 1 and "is not a Balsam site" in result.stderr


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(SettingsError, match=r"settings.yml: file not found$"):
        load_settings(tmp_path / "settings.yml")


def test_agent_module_sections_are_enabled_by_presence_only():
    settings = loads_settings("scheduler: {}\nfile_cleaner: null\n")
    assert settings.scheduler.name == "local"
    assert settings.file_cleaner is None  # null disables
    assert settings.processing is None  # absent disables
    assert settings.queue_maintainer is None
    assert settings.is_enabled("scheduler") and not settings.is_enabled("processing")
    assert settings.filter_tags == {}  # not the 0.7 {workflow: test-1, system: H2O}
    assert loads_settings("filter_tags: null\n").filter_tags == {}


def test_defaults_of_a_new_site():
    settings = Settings()
    assert settings.launcher.platform == "default"
    assert settings.launcher.mpirun_allows_node_packing is None
    assert settings.scheduler.name == "local"
    assert settings.scheduler.allowed_queues == {"local": AllowedQueue(max_nodes=1, max_walltime=1440, max_queued_jobs=1000)}
    assert settings.scheduler.allowed_projects == ["local"]
    assert settings.processing.num_workers == 2
    assert settings.queue_maintainer is None
    assert settings.file_cleaner.cleanup_batch_size == 180
    with pytest.raises(AttributeError, match="settings have no section 'schedular'"):
        settings.schedular


def test_settings_keyword_overrides():
    settings = Settings(processing={"num_workers": 7}, queue_maintainer=None)
    assert settings.processing.num_workers == 7
    with pytest.raises(SettingsError, match="<defaults> processing.num_workers: expected an integer, got 'x'"):
        Settings(processing={"num_workers": "x"})


# Every key of inventory §5.1 (the dotted-class keys became plugin names: launcher.platform, scheduler.name),
# plus the driver options and balsam's own additions (launcher.default_postprocess_in_launcher). The transfers and elastic_queue sections belong to their own agent modules
# (their tests check them).
INVENTORY_KEYS = {
    "logging": ["level", "format", "datefmt", "buffer_num_records", "flush_period", "retention_days"],
    "launcher": ["platform_options", "idle_ttl_sec", "delay_sec", "error_tail_num_lines", "max_concurrent_mpiruns",
                 "mpi_drain_for_large_jobs_sec", "mpirun_allows_node_packing", "serial_mode_prefetch_per_rank", "sort_by",
                 "serial_mode_startup_params", "platform", "default_postprocess_in_launcher"],
    "scheduler": ["name", "options", "sync_period", "allowed_queues", "allowed_projects", "optional_batch_job_params",
                  "job_template_path", "queue_limit_retry_sec"],
    "processing": ["num_workers", "prefetch_depth", "hook_timeout_sec"],
    "queue_maintainer": ["submit_period", "submit_project", "submit_queue", "job_mode", "num_queued_jobs",
                         "num_nodes", "wall_time_min"],
    "file_cleaner": ["cleanup_batch_size", "service_period"],
}


def test_schema_covers_every_inventory_key_with_help():
    specs = {s.key: s for s in section_specs()}
    assert "filter_tags" in specs
    for key, fields in INVENTORY_KEYS.items():
        schema = specs[key].schema
        names = [f.name for f in attrs.fields(schema)]
        assert sorted(names) == sorted(fields), key
        for field in attrs.fields(schema):
            assert field.metadata.get("help"), f"{key}.{field.name} has no help text"


def test_sample_settings_round_trips_and_comments_every_key():
    text = render_sample_settings()
    assert loads_settings(text) == Settings()
    for key, fields in INVENTORY_KEYS.items():
        for name in fields:
            assert f"  {name}:" in text or f"#   {name}:" in text, f"{key}.{name} missing from the sample"
    # Disabled modules are shown as null with a commented-out example that parses when uncommented.
    assert "queue_maintainer: null\n" in text
    block = text.split("queue_maintainer: null\n", 1)[1].split("\n\n", 1)[0]
    body = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# ") and not line.startswith("# To"))
    assert loads_settings(body).queue_maintainer.num_queued_jobs == 5


def test_cli_sample_settings_prints_the_sample():
    result = run_balsam("site", "sample-settings")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_sample_settings()


def test_render_settings_yaml_applies_platform_overrides():
    text = render_settings_yaml(
        {
            "launcher": {"mpirun_allows_node_packing": False},
            "scheduler": {"name": "local", "allowed_queues": {"debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}}},
            "queue_maintainer": {"num_queued_jobs": 2, "submit_queue": "debug"},
            "file_cleaner": None,
        }
    )
    assert text.startswith("# Balsam site settings")
    settings = loads_settings(text)
    assert settings.launcher.mpirun_allows_node_packing is False
    assert settings.launcher.idle_ttl_sec == 60  # untouched defaults stay
    assert settings.scheduler.allowed_queues == {"debug": AllowedQueue(max_nodes=2, max_walltime=60, max_queued_jobs=1)}
    assert settings.queue_maintainer.num_queued_jobs == 2 and settings.queue_maintainer.submit_queue == "debug"
    assert settings.file_cleaner is None
    assert "# Seconds between two checks of the queue." in text


def test_render_settings_yaml_rejects_bad_overrides():
    with pytest.raises(SettingsError) as info:
        render_settings_yaml({"scheduler": {"sync_periodd": 3}})
    assert str(info.value) == "settings overrides scheduler.sync_periodd: unknown key (did you mean 'sync_period'?)"


def test_to_dict_is_settings_yml_shaped():
    data = Settings().to_dict()
    assert data["scheduler"]["allowed_queues"]["local"] == {"max_nodes": 1, "max_walltime": 1440, "max_queued_jobs": 1000}
    assert yaml.safe_load(yaml.safe_dump(data)) == data


# -- SiteConfig -----------------------------------------------------------------------------------


def make_site(path: Path, site_id: str = "7") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".balsam-site").write_text(site_id)
    (path / "settings.yml").write_text(render_sample_settings())
    return path


def test_site_config_paths_and_id(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    site = make_site(tmp_path / "site")
    config = SiteConfig(site)
    assert config.site_path == site.resolve()
    assert config.site_id == 7
    assert config.settings_path == site / "settings.yml"
    assert config.data_path == site / "data"
    assert config.log_path == site / "log"
    assert config.job_path == site / "qsubmit"
    assert config.job_template_path == site / "job-template.sh"
    assert config.settings.scheduler.name == "local"
    (site / ".balsam-site").write_text("site_id: 12\n")
    assert config.site_id == 12
    (site / ".balsam-site").write_text("")
    assert config.site_id is None


def test_site_is_found_from_env_or_by_walking_up(tmp_path, monkeypatch):
    site = make_site(tmp_path / "site")
    deep = site / "data" / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(deep)
    assert SiteConfig.resolve_site_path() == site.resolve()
    other = make_site(tmp_path / "other")
    monkeypatch.setenv("BALSAM_SITE_PATH", str(other))
    assert SiteConfig().site_path == other.resolve()
    assert SiteConfig(site).site_path == site.resolve()  # explicit wins


def test_not_inside_a_site_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SiteNotFoundError, match="not inside a Balsam site: no .balsam-site in"):
        SiteConfig()
    with pytest.raises(SiteNotFoundError, match="is not a Balsam site"):
        SiteConfig(tmp_path)
    monkeypatch.setenv("BALSAM_SITE_PATH", str(tmp_path))
    with pytest.raises(SiteNotFoundError, match=f"BALSAM_SITE_PATH={tmp_path} is not a Balsam site"):
        SiteConfig()


def test_site_settings_error_is_located(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    site = make_site(tmp_path / "site")
    (site / "settings.yml").write_text(BAD_QUEUE)
    with pytest.raises(SettingsError, match=r"settings.yml:14 scheduler.allowed_queues.debug.max_nodes"):
        SiteConfig(site).settings


def test_balsam_home(monkeypatch, tmp_path):
    monkeypatch.setenv("BALSAM_HOME", str(tmp_path / "h"))
    assert balsam_home() == tmp_path / "h"
    monkeypatch.delenv("BALSAM_HOME")
    assert balsam_home() == Path.home() / ".balsam"


def test_settings_reference_documents_every_core_key():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    for key, fields in INVENTORY_KEYS.items():
        section = doc.split(f"### `{key}`", 1)
        assert len(section) == 2, f"docs/settings.md has no section for {key}"
        body = section[1].split("\n### ", 1)[0]
        for name in fields:
            assert f"| `{name}` |" in body, f"docs/settings.md does not document {key}.{name}"


def test_settings_survive_pickling_for_worker_processes():
    import pickle

    settings = loads_settings("scheduler: {sync_period: 3}\nprocessing: {num_workers: 4}\n")
    again = pickle.loads(pickle.dumps(settings))
    assert again == settings
    assert again.scheduler.sync_period == 3 and again.processing.num_workers == 4


# -- orphans, every problem at once, driver options ------------------------------------------------


def test_enabled_section_that_no_installed_module_consumes_is_refused():
    # `nightly_report` stands for a module whose distribution is not installed (as transfers or elastic_queue
    # are when their modules are missing).
    message = error_of("nightly_report:\n  service_period: 5\n")
    assert message == (
        "settings.yml:1 nightly_report: no installed agent module consumes this section (install the distribution "
        "that provides the 'nightly_report' agent module, or set it to null)"
    )
    assert error_of("processing: {}\nnightly_report: {}\n").startswith("settings.yml:2 nightly_report: no installed")
    settings = loads_settings("nightly_report: null\n")  # disabled: nothing to refuse
    assert "nightly_report" not in settings.sections and not settings.is_enabled("nightly_report")
    with pytest.raises(SettingsError, match="<defaults> nightly_report: no installed agent module consumes this section"):
        Settings(nightly_report={"service_period": 5})


def test_a_new_settings_file_has_only_installed_modules_sections():
    text = render_settings_yaml({})
    keys = [line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha()]
    installed = [s.key for s in section_specs()]
    assert keys == installed


def test_check_settings_lists_every_problem(tmp_path):
    path = write(tmp_path, """\
        logging:
          level: LOUD
        launcher:
          idle_ttl: 5
          platform_options: {x: 1}
        scheduler:
          options: {queue_flag: --qos}
          sync_period: 0
        nightly_report: {}
        """)
    result = run_balsam("site", "check-settings", str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: {path}:2 logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'",
        f"Error: {path}:4 launcher.idle_ttl: unknown key (did you mean 'idle_ttl_sec'?)",
        f"Error: {path}:5 launcher.platform_options.x: unknown option (platform 'default' takes no options)",
        f"Error: {path}:7 scheduler.options.queue_flag: unknown option (scheduler 'local' takes no options)",
        f"Error: {path}:8 scheduler.sync_period: must be at least 1, got 0",
        f"Error: {path}:9 nightly_report: no installed agent module consumes this section (install the distribution "
        "that provides the 'nightly_report' agent module, or set it to null)",
        f"6 problems in {path}",
    ]


@attrs.frozen
class FlagOptions:
    from balsam.options import option as _option

    queue_flag: str = _option("--partition", "sbatch flag the queue goes to.")
    retries: int = _option(2, "How often a failed command is tried again.")
    del _option


def test_driver_options_are_checked_against_the_named_drivers_schema(monkeypatch):
    from balsam.builtin.local_scheduler import LocalScheduler
    from balsam.config import site_scheduler

    monkeypatch.setattr(LocalScheduler, "options_schema", FlagOptions)
    settings = loads_settings("scheduler:\n  name: local\n  options:\n    queue_flag: --qos\n")
    assert settings.scheduler.options == FlagOptions(queue_flag="--qos", retries=2)
    driver = site_scheduler(settings)
    assert isinstance(driver, LocalScheduler) and driver.options.queue_flag == "--qos"
    assert Settings().scheduler.options == {} and site_scheduler(Settings()).options == FlagOptions()
    assert error_of("scheduler:\n  options:\n    retries: many\n") == \
        "settings.yml:3 scheduler.options.retries: expected an integer, got 'many'"
    assert error_of("scheduler:\n  options:\n    queue_flg: --qos\n") == \
        "settings.yml:3 scheduler.options.queue_flg: unknown key (did you mean 'queue_flag'?)"
    # The file a site gets shows the chosen driver's options with their help, and so does the sample.
    text = render_settings_yaml({"scheduler": {"options": {"retries": 4}}})
    assert "  options:\n    # sbatch flag the queue goes to.\n    queue_flag: --partition\n" in text
    assert loads_settings(text).scheduler.options.retries == 4
    sample = render_sample_settings()
    assert "# scheduler.options when scheduler.name is 'local':\n#   # sbatch flag the queue goes to.\n" \
           "#   queue_flag: --partition\n" in sample
    assert "# launcher.platform_options when launcher.platform is 'default': none" in sample


# -- what a launcher reads ------------------------------------------------------------------------


def test_launcher_sections_are_read_without_the_agent_modules(tmp_path, monkeypatch):
    import balsam.config.settings as settings_module
    from balsam.config import LAUNCHER_SECTIONS

    def no_plugin_scan():
        raise AssertionError("reading the launcher's sections must not import the agent modules")

    monkeypatch.setattr(settings_module, "section_specs", no_plugin_scan)
    # A broken agent-module section is the agent's concern: the launcher neither checks nor keeps it.
    settings = loads_settings(BAD_QUEUE + "nightly_report: {service_period: 5}\n", only=LAUNCHER_SECTIONS)
    assert list(settings.sections) == ["logging", "filter_tags", "launcher"]
    assert settings.launcher.platform == "default" and settings.filter_tags == {}
    with pytest.raises(AttributeError, match="no section 'scheduler': only logging, filter_tags, launcher were read"):
        settings.scheduler


def test_launcher_sections_are_still_checked_with_their_lines(monkeypatch):
    from balsam.config import LAUNCHER_SECTIONS

    text = "launcher:\n  idle_ttl_sec: soon\n  platform: defualt\nscheduler:\n  sync_period: never\n"
    with pytest.raises(SettingsError) as info:
        loads_settings(text, only=LAUNCHER_SECTIONS)
    errors = info.value.errors
    assert any(e.startswith("settings.yml:2 launcher.idle_ttl_sec: expected an integer") for e in errors), errors
    assert any("settings.yml:3 launcher.platform: unknown platform 'defualt'" in e for e in errors), errors
    assert not any("scheduler" in e for e in errors), errors
    # Read whole (check-settings, the agent), the scheduler section's problem is reported too.
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    assert any(e.startswith("settings.yml:5 scheduler.sync_period") for e in info.value.errors), info.value.errors


def test_site_config_launcher_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("BALSAM_SITE_PATH", raising=False)
    site = make_site(tmp_path / "site")
    (site / "settings.yml").write_text(BAD_QUEUE)
    config = SiteConfig(site)
    assert config.launcher_settings.launcher.idle_ttl_sec == 60
    assert config.launcher_settings.only == ("logging", "filter_tags", "launcher")
    with pytest.raises(SettingsError, match=r"settings.yml:14 scheduler.allowed_queues.debug.max_nodes"):
        config.settings
    (site / "settings.yml").write_text(BAD_QUEUE.replace("max_nodes: two", "max_nodes: 2"))
    whole = config.reload_settings()
    assert config.launcher_settings is whole  # read whole already: nothing to read again


# -- logging: buffer_num_records and flush_period ---------------------------------------------------


def _file_logger(tmp_path: Path, **settings) -> tuple[logging.Logger, logging.Handler, Path]:
    path = tmp_path / "site.log"
    handler = log_file_handler(path, LoggingSettings(format="%(levelname)s %(message)s", **settings))
    logger = logging.getLogger(f"balsam.test_log_buffer.{tmp_path.name}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, handler, path


def test_buffered_log_records_are_written_after_flush_period_without_more_logging(tmp_path):
    logger, handler, path = _file_logger(tmp_path, buffer_num_records=100, flush_period=1)
    try:
        logger.info("held %d", 1)
        assert path.read_text() == ""  # in memory, not yet written
        deadline = time.monotonic() + 10
        while path.read_text() == "" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.read_text() == "INFO held 1\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_warning_is_written_at_once_with_the_records_before_it_and_close_writes_the_rest(tmp_path):
    logger, handler, path = _file_logger(tmp_path, buffer_num_records=100, flush_period=3600)
    try:
        logger.info("before")
        logger.warning("careful")
        assert path.read_text() == "INFO before\nWARNING careful\n"
        logger.info("after")
    finally:
        logger.removeHandler(handler)
        handler.close()  # what logging.shutdown does at a normal exit
    assert path.read_text() == "INFO before\nWARNING careful\nINFO after\n"


def test_a_buffer_of_full_capacity_is_written(tmp_path):
    logger, handler, path = _file_logger(tmp_path, buffer_num_records=3, flush_period=3600)
    try:
        args = {"n": 1}
        logger.info("n=%(n)s", args)
        args["n"] = 2  # the line says what was logged, not what the argument became before the flush
        logger.info("two")
        assert path.read_text() == ""
        logger.info("three")
        assert path.read_text() == "INFO n=1\nINFO two\nINFO three\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("settings", [{"buffer_num_records": 1}, {"buffer_num_records": 0}, {"flush_period": 0}])
def test_unbuffered_logging_writes_each_record_at_once(tmp_path, settings):
    logger, handler, path = _file_logger(tmp_path, **settings)
    try:
        assert type(handler) is logging.FileHandler
        logger.info("now")
        assert path.read_text() == "INFO now\n"
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("text, expected", [
    # An unknown key hid the section's range problems (check-settings promises every problem of the file).
    ("launcher:\n  idle_ttl_sec: -1\n  delay_sec: 0\n  bogus: 1\n",
     ["settings.yml:2 launcher.idle_ttl_sec: must not be negative, got -1",
      "settings.yml:3 launcher.delay_sec: must be at least 1, got 0",
      "settings.yml:4 launcher.bogus: unknown key"]),
    # A type error hid them too.
    ("launcher:\n  idle_ttl_sec: x\n  delay_sec: 0\n",
     ["settings.yml:2 launcher.idle_ttl_sec: expected an integer, got 'x'",
      "settings.yml:3 launcher.delay_sec: must be at least 1, got 0"]),
])
def test_every_problem_of_a_section_is_reported_at_once(text, expected):
    with pytest.raises(SettingsError) as info:
        loads_settings(text)
    assert [e.split(" (")[0] for e in info.value.errors] == expected

