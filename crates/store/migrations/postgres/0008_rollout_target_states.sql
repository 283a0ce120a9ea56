-- Each rollout target's state as the planner last saved it, so a restarted (or newly
-- elected) server restores the planner where it was instead of replaying offers.
ALTER TABLE rollout_targets ADD COLUMN state TEXT NOT NULL DEFAULT 'waiting';
-- Wall-clock Unix ms of the offer, while in flight.
ALTER TABLE rollout_targets ADD COLUMN since BIGINT;
-- Why the rollout halted itself (planner's reason), while it is halted.
ALTER TABLE rollouts ADD COLUMN halt TEXT;
-- The last transition in words (shown in progress).
ALTER TABLE rollouts ADD COLUMN reason TEXT;
-- Wall-clock Unix ms when the current phase's offline targets are skipped.
ALTER TABLE rollouts ADD COLUMN wait_until BIGINT;
-- Failures and successes an operator's override accepted.
ALTER TABLE rollouts ADD COLUMN forgiven_failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE rollouts ADD COLUMN forgiven_succeeded BIGINT NOT NULL DEFAULT 0;
-- How many times an operator overrode a halt.
ALTER TABLE rollouts ADD COLUMN overrides BIGINT NOT NULL DEFAULT 0;
-- An operator's pause/resume/abort taken by a replica that does not lead, for the leader.
ALTER TABLE rollouts ADD COLUMN control TEXT;
ALTER TABLE rollouts ADD COLUMN control_actor TEXT;
-- Rollouts made before this: each target's state from its latest offer.
UPDATE rollout_targets SET
    state = COALESCE((
        SELECT CASE u.state
            WHEN 'succeeded' THEN 'succeeded'
            WHEN 'failed' THEN CASE WHEN u.error = 'timed out' THEN 'timed_out' ELSE 'failed' END
            WHEN 'rolled_back' THEN 'failed'
            WHEN 'cancelled' THEN 'waiting'
            ELSE 'in_flight' END
        FROM ota_updates u
        WHERE u.rollout_id = rollout_targets.rollout_id AND u.device_id = rollout_targets.device_id
        ORDER BY u.created_at DESC LIMIT 1), 'waiting'),
    since = (
        SELECT u.created_at FROM ota_updates u
        WHERE u.rollout_id = rollout_targets.rollout_id AND u.device_id = rollout_targets.device_id
          AND u.state IN ('offered', 'started', 'in_progress')
        ORDER BY u.created_at DESC LIMIT 1);
-- A rollout that stopped itself before this stopped on its failures (an override forgives them).
UPDATE rollouts SET halt = 'too_many_failures' WHERE state = 'stopped';
CREATE INDEX rollout_targets_state ON rollout_targets(rollout_id, state);
