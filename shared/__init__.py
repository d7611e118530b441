"""Contracts both sides share: errors, the input schema, the manifest and the table format.

Pure numpy + standard library: no I/O libraries, nothing from the cloud.
"""
