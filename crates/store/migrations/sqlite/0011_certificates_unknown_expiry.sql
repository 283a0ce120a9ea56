-- Certificates recorded from devices whose expiry was not known got not_after 0, which made a
-- revoked one look expired (left out of the CRL) for ever. Unknown means never expires here.
UPDATE certificates SET not_after = 9223372036854775807 WHERE not_after = 0;
