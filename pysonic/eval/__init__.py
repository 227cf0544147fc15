"""Objective evaluation: SynthBench (``pysonic.eval.synthbench``) and its audio analysers
(``pysonic.eval.analysis``)."""
