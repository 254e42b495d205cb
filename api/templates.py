"""Templates of the send API: Jinja2 in its immutable sandbox, with limits on what a
template may cost. Pure apart from the clock; rendering runs in a worker thread
(`render_all`), never on the event loop.

EmailLabs' templates use Twig's `{{ name }}` syntax, which is Jinja's. Jinja2's
`ImmutableSandboxedEnvironment` (jinja2 >= 3.1.6, which fixed the last published
sandbox escapes through `str.format` and the `attr` filter) refuses attributes that
start with `_`, the internals of functions, frames and generators, and calls that
modify lists or dicts; templates see only the request's variables (strings, numbers,
lists and maps) and the `range`, `cycler` and `joiner` globals. On top:

- integer arguments to any call, filter or `range` are capped (MAX_INT_ARG), and string
  arguments (a recursive macro doubling one) at MAX_OUTPUT; `*` and `+` may not build a
  string or list longer than MAX_OUTPUT, `**` takes exponents up to 64, and `%`
  on strings is refused: no template allocates gigabytes with one expression;
- each rendered part is cut off at MAX_OUTPUT characters (an error, not a truncation);
- each recipient's render has a CPU deadline (RENDER_SECONDS), checked on every line of
  the compiled template's code, and a request has a budget for all of them: a template
  looping for ever fails its recipients instead of holding a worker.

What a `{{ … }}` prints is data or nothing: a function, method or other Python object
prints as an empty string, never as its repr. HTML is rendered with autoescape on (a
variable holding `<script>` arrives as text), the subject and the text part without. A
failing render is an error for that recipient only.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import attrs
from jinja2 import TemplateError as JinjaTemplateError
from jinja2 import TemplateSyntaxError, Undefined
from jinja2.environment import Template
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from api.compose import Content, ParamError

__all__ = ["MAX_OUTPUT", "Compiled", "RenderError", "compile_content", "render", "render_all"]

MAX_INT_ARG = 10_000
MAX_RANGE = 10_000
MAX_OUTPUT = 2_000_000  # characters per rendered part
MAX_SOURCE = 1_000_000  # characters of template source per part
RENDER_SECONDS = 0.5  # one recipient's parts
REQUEST_SECONDS = 5.0  # all recipients of a request


class RenderError(Exception):
    """A recipient's template failed to render; the message says why."""


class _Deadline(BaseException):
    """Raised from the trace function: a BaseException, so templates cannot catch it."""


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_ARG:
            raise SecurityError(f"integer argument {v} over the limit of {MAX_INT_ARG}")
        if isinstance(v, str | list | tuple | dict) and len(v) > MAX_OUTPUT:
            raise SecurityError(f"argument of {len(v)} items over the limit of {MAX_OUTPUT}")


def _guard(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)  # keeps jinja_pass_arg (pass_context etc.)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args[1:], kwargs)
        return f(*args, **kwargs)
    return guarded


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _is_data(v: Any, depth: int = 0) -> bool:
    """Request data (strings, numbers, lists and maps of them), not a Python object."""
    if isinstance(v, _PLAIN_TYPES):
        return True
    if depth > 8:
        return False
    if isinstance(v, list | tuple):
        return all(_is_data(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(_is_data(k, depth + 1) and _is_data(x, depth + 1) for k, x in v.items())
    return False


def _finalize(v: Any) -> Any:
    """What `{{ … }}` prints: data as is (Undefined prints empty), any other object (a
    bound method, a function, a global) as nothing: no repr of a Python object reaches
    the message."""
    return v if isinstance(v, Undefined) or _is_data(v) else ""


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise SecurityError(f"range of {len(r)} items; at most {MAX_RANGE}")
    return r


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(autoescape=autoescape, auto_reload=False, cache_size=0,
                         finalize=_finalize)
        self.filters = {name: _guard(f) for name, f in self.filters.items()}
        # No `namespace` (state carried across loop iterations could double a string each
        # time), no `lipsum` or `dict`.
        self.globals = {"range": _range, "cycler": self.globals["cycler"],
                        "joiner": self.globals["joiner"]}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int):
                    if len(seq) * max(n, 0) > MAX_OUTPUT:
                        raise SecurityError("repetition builds too long a value")
        elif operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple) \
                    and len(left) + len(right) > MAX_OUTPUT:
                raise SecurityError("concatenation builds too long a value")
        elif operator == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError("exponent over 64")
        elif operator == "%" and isinstance(left, str):
            raise SecurityError("% formatting of strings is not allowed")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


_HTML = _Sandbox(autoescape=True)
_PLAIN = _Sandbox(autoescape=False)


@attrs.frozen
class Compiled:
    subject: Template
    html: Template | None
    text: Template | None


def _compile(env: _Sandbox, source: str | None, param: str) -> Template | None:
    if source is None:
        return None
    if len(source) > MAX_SOURCE:
        raise ParamError(param, f"template longer than {MAX_SOURCE} characters")
    try:
        return env.from_string(source)
    except TemplateSyntaxError as e:
        raise ParamError(param, f"template error on line {e.lineno}: {e.message}") from None
    except (JinjaTemplateError, RecursionError) as e:
        raise ParamError(param, f"template error: {e}") from None


def compile_content(content: Content) -> Compiled:
    """Parse the three parts; a syntax error is a ParamError naming html, text or subject."""
    subject = _compile(_PLAIN, content.subject, "subject")
    assert subject is not None
    return Compiled(subject, _compile(_HTML, content.html, "html"),
                    _compile(_PLAIN, content.text, "text"))


def _collect(parts: Iterator[str], what: str) -> str:
    out: list[str] = []
    size = 0
    for chunk in parts:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise RenderError(f"{what}: rendered text longer than {MAX_OUTPUT} characters")
        out.append(chunk)
    return "".join(out)


def _traced(deadline: float, call: Callable[[], Content]) -> Content:
    """Run `call` with a trace function that stops template code past `deadline`."""
    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Deadline
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        # Only the compiled templates' frames (their code's file is "<template>").
        return local if frame.f_code.co_filename == "<template>" else None

    old = sys.gettrace()
    sys.settrace(trace)
    try:
        return call()
    finally:
        sys.settrace(old)


def render(compiled: Compiled, variables: Mapping[str, Any], global_vars: Mapping[str, Any],
           *, seconds: float = RENDER_SECONDS) -> Content:
    """One recipient's parts; RenderError says what failed. Call from a worker thread."""
    ctx = {**global_vars, **variables}

    def run() -> Content:
        subject = _collect(compiled.subject.generate(ctx), "subject")
        html = _collect(compiled.html.generate(ctx), "html") if compiled.html else None
        text = _collect(compiled.text.generate(ctx), "text") if compiled.text else None
        return Content(" ".join(subject.split()), html, text)

    try:
        return _traced(time.monotonic() + seconds, run)
    except _Deadline:
        raise RenderError(f"rendering took longer than {seconds} s") from None
    except SecurityError as e:
        raise RenderError(f"not allowed in a template: {e}") from None
    except RenderError:
        raise
    except RecursionError:
        raise RenderError("template recursion too deep") from None
    except Exception as e:
        raise RenderError(f"{type(e).__name__}: {e}") from None


def render_all(compiled: Compiled, per_recipient: Sequence[Mapping[str, Any]],
               global_vars: Mapping[str, Any], *, budget: float = REQUEST_SECONDS
               ) -> list[Content | RenderError]:
    """Every recipient's parts or its error, within `budget` seconds for all of them."""
    end = time.monotonic() + budget
    out: list[Content | RenderError] = []
    for variables in per_recipient:
        left = end - time.monotonic()
        if left <= 0:
            out.append(RenderError(f"the request's rendering budget of {budget} s is used up"))
            continue
        try:
            out.append(render(compiled, variables, global_vars, seconds=min(RENDER_SECONDS, left)))
        except RenderError as e:
            out.append(e)
    return out
