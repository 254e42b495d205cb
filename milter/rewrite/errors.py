"""The rewriter's one exception, apart so that the HTML tokenizer (markup.py) needs nothing
but the standard library: a test runs it under Debian's own Python as well."""


class RewriteError(Exception):
    """Malformed MIME or HTML: the message goes out unrewritten."""
