"""Studies: a study file expanded into runs (spec), the statistics (stats) and the figures
(figures) of its report. The CLIs are hvcodistill.sweep and hvcodistill.report."""
