"""Report sections for the papers' open questions (issue #12; docs/theory.md §10): batch size and seeds as
replicates. analysis.report imports this module as a plugin; importing it registers both sections,
each of which skips with a reason when the sweep has fewer than 2 batch sizes or 2 seeds per group."""

from analysis.batch_size import batch_size_section
from analysis.replicates import replicates_section
from analysis.sections import register_section

for _fn in (batch_size_section, replicates_section):
    register_section(_fn)
