-- The ledger cannot be emptied. Its append-only trigger (0001) is row-level, and TRUNCATE fires
-- no row triggers: a statement-level trigger refuses it. (Only an owner who first disables
-- this trigger can truncate; `dispatcher audit` reports a ledger trigger missing or disabled.)
CREATE FUNCTION ledger_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: TRUNCATE is refused';
END $$;
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_no_truncate();
