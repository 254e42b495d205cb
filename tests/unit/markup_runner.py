"""Reads pages (JSON list of latin-1 strings) on stdin, writes what milter.rewrite.markup
finds in each (hrefs, </body>; JSON) on stdout: run by test_rewrite_markup_portable.py under Debian's own
Python, with -I -S, so only the standard library is there.

milter/rewrite/__init__.py imports the whole rewriter (attrs and more): the package is
stood in for by an empty one, so that only the tokenizer and what it imports load.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
package = types.ModuleType("milter.rewrite")
package.__path__ = [str(ROOT / "milter" / "rewrite")]
sys.modules["milter.rewrite"] = package

from milter.rewrite import markup  # noqa: E402
from milter.rewrite.errors import RewriteError  # noqa: E402


def main() -> None:
    results: list[dict[str, object]] = []
    for page in json.load(sys.stdin):
        try:
            found = markup.scan(page.encode("latin-1"))
        except RewriteError as e:
            results.append({"error": str(e)})
            continue
        results.append({"found": [[s, e, q.decode("latin-1"), notrack] for s, e, q, notrack in found.hrefs],
                        "empty": found.empty, "body_end": found.body_end})
    # Modules loaded from outside the standard library (the repository's own aside).
    foreign = sorted(name for name, module in sys.modules.items()
                     if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "milter"
                     and name != "__main__" and getattr(module, "__file__", None) is not None)
    json.dump({"version": sys.version, "executable": sys.executable, "foreign": foreign,
               "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
