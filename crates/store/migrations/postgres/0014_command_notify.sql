-- A command's state change is announced to every replica at commit (LISTEN flotilla_commands),
-- so a request waiting on one replica for a command answered through another wakes at once.
-- Whoever wrote the change (ingest of a reply, the expiry sweep, a delivery), the trigger
-- announces it; listeners re-read the row, so a lost notice only delays them.
CREATE FUNCTION flotilla_notify_command() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('flotilla_commands', NEW.id);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER commands_notify_state
    AFTER UPDATE OF state ON commands
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION flotilla_notify_command();
