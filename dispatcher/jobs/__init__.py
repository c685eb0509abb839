"""Jobs: the publishers' contract, the job state store and the outcomes handlers return."""
