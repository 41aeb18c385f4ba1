"""Studies: a study file expanded into runs (spec), the runs started locally or on SLURM
(runner), their results read back (results) with the statistics (stats), and the report drawn
from them (markdown, figures). The commands are hvcodistill.sweep and hvcodistill.report."""
