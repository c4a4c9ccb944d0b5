"""Stream processors: the Faust app, its agents and the content checks."""
