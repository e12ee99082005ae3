"""Candidate pairs: raw web (image URL, text) pairs → whole-word query matching → query-balanced table.

The library half of part 1 of the data pipeline; the command-line programs are
``data_pipelines.extract``, ``data_pipelines.balance`` and ``data_pipelines.build_queries``.
See README.md beside this file for the matching and balancing rules.
"""
