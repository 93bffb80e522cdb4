"""The agent that pulls and runs jobs, and the trainers it runs."""
