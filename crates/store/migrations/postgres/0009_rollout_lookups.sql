-- The leader reads open rollouts and operators' pending controls every second.
CREATE INDEX rollouts_state ON rollouts(state);
CREATE INDEX rollouts_pending_control ON rollouts(control) WHERE control IS NOT NULL;
