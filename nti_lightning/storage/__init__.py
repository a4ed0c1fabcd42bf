"""Files on disk: atomic writes, the output folder's lock, the run's config beside its results.

The lowest layer's I/O: everything that writes results (artifacts, reports, edits, the bench's
tables, the app's cache) goes through these, so a crash never leaves a half-written file.
"""
