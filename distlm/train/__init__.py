"""Engine setup, the step, the loop, LR schedules and evaluation."""
