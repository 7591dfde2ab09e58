"""examples: runnable scenarios a user starts from."""
