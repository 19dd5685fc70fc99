"""Thin command-line entry points of the DVC pipeline (see dvc.yaml)."""
