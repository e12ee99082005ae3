"""The three passes of the scalable pipeline, each a set of independent, restartable jobs:
extract (one job per input) → count (one per URL bucket) → merge (one) → select (one per URL bucket)."""
