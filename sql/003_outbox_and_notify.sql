-- The announcement outbox, and the notifications that keep every worker's goal cache current.

-- One row per achievement to announce on `workflow.goal.achieved`, written in the same
-- transaction as the achievement and deleted once published: a worker that dies between the
-- commit and the publish leaves its rows here for another worker to relay.
CREATE TABLE goalstream_outbox (
    id BIGSERIAL PRIMARY KEY,
    achievement_id UUID NOT NULL,
    payload TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_outbox_created ON goalstream_outbox(created_at);

-- Tell workers which goal changed; they reload just that goal.
CREATE FUNCTION goalstream_notify_goal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('goalstream_goals', 'goal:' || COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER workflow_goals_notify
    AFTER INSERT OR UPDATE OR DELETE ON workflow_goals
    FOR EACH ROW EXECUTE FUNCTION goalstream_notify_goal();

-- A workflow switched on or off (or deleted) changes whether all its goals are live.
CREATE FUNCTION goalstream_notify_workflow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.is_active IS DISTINCT FROM OLD.is_active THEN
        PERFORM pg_notify('goalstream_goals', 'workflow:' || COALESCE(NEW.id, OLD.id)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER workflows_notify
    AFTER UPDATE OR DELETE ON workflows
    FOR EACH ROW EXECUTE FUNCTION goalstream_notify_workflow();
