"""The system as a whole: pipelines, separate processes, faults, load, the browser, attacks."""
