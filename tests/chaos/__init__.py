"""The chaos run (issue 18): randomized, seeded faults on real processes under a steady load of
generations and EventSource-like viewers, judged by an exactly-once checker. ``bash
scripts/chaos`` runs it; ``tests/faults/test_chaos.py`` runs a short one in the suite."""
