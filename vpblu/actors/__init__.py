"""Controller-side actors: one file per actor, named for what it owns."""
