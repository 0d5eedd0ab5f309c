"""Tools around training runs: ``grao plan`` (memory and time estimates), ``grao compare`` (methods side by
side) and the metrics plots."""
