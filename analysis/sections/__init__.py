"""The report's sections, one module per section (or per family of sections) in this package.

A section module defines

* ``SECTIONS``: a tuple of functions ``section(sweep, out_dir, opts) -> SectionResult`` (the
  types and shared helpers are in ``analysis.sections.common``); a section raises ``Skip(reason)``
  when the sweep lacks what it needs;
* ``ORDER``: a number placing its sections in the report (summary.md and summary.csv follow it).

``all_sections()`` lists the package's modules, imports each one and returns the sections of those
that define ``SECTIONS``, by ``ORDER`` (then module name). Modules without ``SECTIONS`` (``common``,
``vmf_table``) are helpers. Adding a section is therefore one new module here: nothing else names it.
The report driver is ``analysis.report``.
"""

from __future__ import annotations

import importlib
import pkgutil


def section_modules() -> list:
    """The modules of this package that define SECTIONS, in report order (ORDER, then name)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "SECTIONS"):
            found.append(module)
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 1000), m.__name__))


def all_sections() -> list:
    """Every report section function, in report order."""
    return [fn for module in section_modules() for fn in module.SECTIONS]
