"""The dispatcher's error tree: one base, specific subclasses whose docstring is the message."""

from __future__ import annotations


class DispatcherError(Exception):
    """Dispatcher error."""

    code = "dispatcher_error"

    def __init__(self, message: str | None = None, **details: object) -> None:
        self.details = details
        super().__init__(message or (self.__doc__ or self.code).strip())


class ServiceUnavailable(DispatcherError):
    """A required service (PostgreSQL or RabbitMQ) cannot be reached."""

    code = "service_unavailable"


class DatabaseMissing(DispatcherError):
    """The configured PostgreSQL database does not exist."""

    code = "database_missing"


class DatabaseNotMigrated(DispatcherError):
    """The database is not migrated: run `dispatcher migrate`."""

    code = "database_not_migrated"


class PortUnavailable(DispatcherError):
    """The HTTP port cannot be listened on."""

    code = "port_unavailable"


class InvalidAmount(DispatcherError):
    """The amount must be a positive whole number of credits."""

    code = "invalid_amount"


class InvalidAutoRecharge(DispatcherError):
    """The auto-recharge amount must be greater than the threshold when it is enabled."""

    code = "invalid_auto_recharge"


class UnknownAccount(DispatcherError):
    """No account with this id exists."""

    code = "unknown_account"


class AccountExists(DispatcherError):
    """An account with this id already exists."""

    code = "account_exists"


class InsufficientCredits(DispatcherError):
    """The account does not have enough available credits."""

    code = "insufficient_credits"


class UnknownReservation(DispatcherError):
    """No reservation exists for this job id."""

    code = "unknown_reservation"


class ReservationConflict(DispatcherError):
    """The job id is already used by a different reservation (other account or amount)."""

    code = "reservation_conflict"


class JobIdConflict(DispatcherError):
    """This job id was already used for a different job (another account or other content)."""

    code = "job_id_conflict"


class AlreadySettled(DispatcherError):
    """The reservation was already settled differently."""

    code = "already_settled"


class InvalidGrant(DispatcherError):
    """The grant kind or reference is not valid."""

    code = "invalid_grant"


class RefundTooLarge(DispatcherError):
    """The refund exceeds the unspent credits of that purchase."""

    code = "refund_too_large"


class InvalidRecipient(DispatcherError):
    """The recipient is not a valid E.164 phone number."""

    code = "invalid_recipient"


class UnknownChannel(DispatcherError):
    """The channel must be 'sms' or 'call'."""

    code = "unknown_channel"


class InvalidPlan(DispatcherError):
    """The plan settings are not valid."""

    code = "invalid_plan"
