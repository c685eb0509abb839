-- Twilio Smart Encoding (dispatcher/pricing/smart_encoding.py), per account, off by default.
-- When on, the dispatcher replaces look-alike characters itself before pricing and sending.
-- A broadcast keeps the setting it was priced with, so its recipients are sent that text.

ALTER TABLE accounts ADD COLUMN smart_encoding boolean NOT NULL DEFAULT false;
ALTER TABLE broadcasts ADD COLUMN smart_encoding boolean NOT NULL DEFAULT false;
