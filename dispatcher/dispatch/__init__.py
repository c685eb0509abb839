"""The dispatch pipeline: consume, handle (reserve, send, settle) and acknowledge."""
