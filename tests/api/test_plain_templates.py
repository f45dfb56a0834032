"""Command templates of plain text and ``{{ name }}`` are read and rendered without Jinja2: the
result must be what Jinja2 gives, and anything else must still go to Jinja2."""

from __future__ import annotations

import subprocess
import sys

import jinja2
import jinja2.defaults
import jinja2.meta
import pytest

from balsam._api.app import _JINJA_SPECIAL_NAMES, _plain_template, template_variables

PLAIN = [
    "echo {{ x }}",
    "{{x}}",
    "a {{ x }} b {{\ty\t}} {{ x }}",
    "{{ x }}}",
    "} {{ x }} }} %} #} {",
    "mpirun -n 4 ./sim --in {{ input_file }} --steps={{steps}} > out.txt",
    "no variables at all",
    "line one\nline two {{ x }}",
    "{{ loop }} {{ caller }} {{ kwargs }} {{ super }}",
]
JINJA = [
    "{{{ x }}}",
    "{{ x|upper }}",
    "{{- x }}",
    "{{ x -}} y",
    "{% if x %}a{% endif %}",
    "{# comment #}{{ x }}",
    "a\r\nb {{ x }}",
    "{{ x }}\n",
    "{{\nx\n}}",
    "{{ range }}",
    "{{ self }}",
    "{{ none }}",
    "{{ if }}",
    "{{ x.y }}",
    "{{ é }}",
]


@pytest.mark.parametrize("template", PLAIN + JINJA)
def test_plain_path_matches_jinja2(template):
    values = {name: f"<{name}>" for name in ("x", "y", "steps", "input_file", "loop", "caller", "kwargs", "super")}
    plain = _plain_template(template)
    assert (plain is not None) == (template in PLAIN)
    try:
        expected_vars = set(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateSyntaxError:
        with pytest.raises(AttributeError, match="not a valid Jinja2 template"):
            template_variables(template)
        return
    assert template_variables(template) == expected_vars
    if plain is not None:
        rendered = "".join(values[p] if i % 2 else p for i, p in enumerate(plain))
        assert rendered == jinja2.Template(template).render(values)


def test_special_names_cover_jinja2_globals():
    assert set(jinja2.defaults.DEFAULT_NAMESPACE) <= _JINJA_SPECIAL_NAMES


def test_loading_a_plain_shell_app_does_not_import_jinja2():
    code = (
        "import sys; from balsam._api.app import ApplicationDefinition\n"
        "class Hello(ApplicationDefinition):\n"
        "    site = 1\n"
        "    command_template = 'echo {{ name }}'\n"
        "assert Hello.parameters['name']['required']\n"
        "assert 'jinja2' not in sys.modules, 'jinja2 imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
