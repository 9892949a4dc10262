"""The one-command demo's library (`make demo`, `jobs/demo.py`): its figures and the check of its outputs."""
