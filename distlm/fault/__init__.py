"""Faults: injection for tests (``inject``); preemption, watchdog and NaN policy come later."""
