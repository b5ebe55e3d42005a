"""The reproduction behind reproduce.py: presets (scale, seeds, threat models), the plan of a preset's steps, the
state of each step's folder, and the job pool that runs them. reproduce.py is the command line over it."""
