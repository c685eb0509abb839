"""dispatcher: consume message jobs, reserve credits in PostgreSQL, send through Twilio, settle."""

__version__ = "0.1.0"
