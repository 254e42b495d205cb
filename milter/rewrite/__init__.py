"""Byte-preserving click/open tracking for message bodies (the milter's end-of-message step).

rewrite_body() replaces the href values of the HTML parts (and, optionally, bare URLs
of text/plain parts) with tracked URLs and adds an open pixel, splicing the changes into
the original bytes: headers, boundaries and untouched parts stay byte-identical, and a
changed part keeps its transfer encoding and charset. Malformed MIME or HTML yields an
error and no body, never a guess.
"""

from milter.rewrite.body import rewrite_body
from milter.rewrite.model import RewriteConfig, RewriteResult

__all__ = ["RewriteConfig", "RewriteResult", "rewrite_body"]
