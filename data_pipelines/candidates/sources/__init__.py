"""Candidate sources. Each is a generator of ``records.SourceEvent``: one Candidate or Rejected per input
row, and a Skipped for a page or record that produced no rows."""
