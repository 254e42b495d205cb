"""api/templates.py: per-recipient rendering in Jinja2's immutable sandbox, and what a
template cannot do: reach Python internals, run code, allocate without bound or loop for
ever. A failing render is that recipient's error, not the request's."""

from __future__ import annotations

import time

import pytest

from api.compose import Content, ParamError
from api.template_store import parse_add_template
from api.templates import Compiled, RenderError, compile_content, render, render_all


def one(html: str, variables: dict[str, object] | None = None) -> Content | RenderError:
    return render_all(compile_content(Content("s", html, None)), [variables or {}], {})[0]


def html_of(html: str, variables: dict[str, object] | None = None) -> str:
    out = one(html, variables)
    assert isinstance(out, Content), out
    assert out.html is not None
    return out.html


def test_each_recipient_gets_its_vars_over_the_global_ones() -> None:
    compiled = compile_content(Content("Hello {{ name }}", "<p>{{ greeting }}, {{ name }}</p>",
                                       "{{ greeting }}, {{ name }} ({{ shop }})"))
    out = render_all(compiled, [{"name": "Bob"}, {"name": "Amy", "greeting": "Hej"}],
                     {"greeting": "Hi", "shop": "Shop"})
    assert out == [Content("Hello Bob", "<p>Hi, Bob</p>", "Hi, Bob (Shop)"),
                   Content("Hello Amy", "<p>Hej, Amy</p>", "Hej, Amy (Shop)")]


def test_html_is_autoescaped_text_and_subject_are_not() -> None:
    compiled = compile_content(Content("{{ v }}", "<b>{{ v }}</b>", "{{ v }}"))
    out = render(compiled, {"v": "<script>&"}, {})
    assert out == Content("<script>&", "<b>&lt;script&gt;&amp;</b>", "<script>&")


def test_a_subject_rendering_newlines_is_one_line() -> None:
    compiled = compile_content(Content("{{ a }}", None, "x"))
    assert render(compiled, {"a": "one\r\nBcc: x@example.org"}, {}).subject == "one Bcc: x@example.org"


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__['__builtins__']['__import__']('os') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__ }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ name.__class__ }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ '{0.__class__.__mro__}'.format(name) }}",
    "{{ name.format_map }}{{ ''.format_map({}) }}",
    "{% set x = [] %}{{ x.append(1) }}{{ x }}",
    "{{ lipsum.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ request }}{{ config }}{{ os }}",
])
def test_templates_cannot_reach_python_internals(payload: str) -> None:
    out = one(payload, {"name": "Bob"})
    if isinstance(out, RenderError):
        assert str(out).startswith(("not allowed in a template: access to attribute",
                                    "UndefinedError")), out
        return
    text = (out.html or "").replace("&lt;", "<").replace("&#39;", "'")
    for leak in ("<class", "<module", "<function", "<built-in", "<bound", "<Template", "uid=",
                 "object at 0x", "[1]"):
        assert leak not in text, (payload, text)


@pytest.mark.parametrize("payload, reason", [
    ("{{ range(10**9)|list|length }}", "integer argument"),
    ("{% for i in range(100001) %}{% endfor %}", "integer argument"),
    ("{{ 'x' * 1000000000 }}", "too long"),
    ("{{ ['x'] * 1000000000 }}", "too long"),
    ("{{ 'x'|center(1000000000) }}", "integer argument"),
    ("{{ 'x'.ljust(1000000000) }}", "integer argument"),
    ("{{ 9 ** 999999 }}", "exponent"),
    ("{{ '%0999999999d' % 1 }}", "formatting"),
    ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('x', 40) }}",
     "over the limit"),
    ("{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for i in range(9999) %}{{ 'x'|center(9999) }}{% endfor %}", "longer than 2000000"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
])
def test_runaway_templates_fail_with_a_reason_instead_of_exhausting_the_host(payload: str,
                                                                             reason: str) -> None:
    started = time.monotonic()
    out = one(payload)
    assert isinstance(out, RenderError), out
    assert reason in str(out)
    assert time.monotonic() - started < 3


def test_a_failing_render_is_that_recipients_error_only() -> None:
    compiled = compile_content(Content("Hi", "{{ 100 // n }}", None))
    out = render_all(compiled, [{"n": 4}, {"n": 0}, {"n": 5}], {})
    assert isinstance(out[1], RenderError) and "ZeroDivisionError" in str(out[1])
    assert [o.html for o in (out[0], out[2]) if isinstance(o, Content)] == ["25", "20"]


def test_the_request_budget_fails_the_recipients_it_cannot_cover() -> None:
    compiled = compile_content(Content("s", "{% for i in range(9999) %}{% for j in range(9999) %}"
                                            "{% endfor %}{% endfor %}", None))
    started = time.monotonic()
    out = render_all(compiled, [{}] * 50, {}, budget=1.0)
    assert time.monotonic() - started < 2
    assert all(isinstance(o, RenderError) for o in out)
    assert "budget" in str(out[-1])


def test_syntax_errors_are_parameter_errors_naming_the_part() -> None:
    with pytest.raises(ParamError) as e:
        compile_content(Content("ok", "<p>{{ name </p>", None))
    assert e.value.param == "html" and "line 1" in e.value.message
    with pytest.raises(ParamError) as e:
        compile_content(Content("{% if %}", None, "x"))
    assert e.value.param == "subject"


def test_add_template_takes_html_and_emaillabs_txt_and_checks_them() -> None:
    assert parse_add_template({"html": "<p>{{ a }}</p>", "txt": "{{ a }}"}) == ("<p>{{ a }}</p>",
                                                                               "{{ a }}")
    with pytest.raises(ParamError) as e:
        parse_add_template({"txt": "{% for %}"})
    assert e.value.param == "txt"
    with pytest.raises(ParamError) as e:
        parse_add_template({})
    assert e.value.param == "html"


def test_compiled_templates_are_reusable_across_recipients() -> None:
    compiled = compile_content(Content("{{ n }}", None, "{{ n * 2 }}"))
    assert isinstance(compiled, Compiled)
    assert [render(compiled, {"n": i}, {}).text for i in range(3)] == ["0", "2", "4"]
