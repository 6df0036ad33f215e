"""Launcher: composes the config, owns the run directory and supervises one trainer process per host."""
