"""The ndbench runner, metrics, records, tables and command-line interface."""
