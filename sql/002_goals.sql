-- SPEC-WFL-007's goal tables, with CONTRACT 4's additions (mode, conversion window) and a soft
-- delete: a deleted goal stops matching while its achievements (which reference it) stay.

CREATE TYPE goal_type AS ENUM (
    'tag_added',
    'purchase_made',
    'appointment_booked',
    'form_submitted',
    'pipeline_stage_reached'
);

CREATE TABLE workflow_goals (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_id UUID NOT NULL REFERENCES workflows(id) ON DELETE CASCADE,
    tenant_id UUID NOT NULL REFERENCES tenants(id),
    goal_type goal_type NOT NULL,
    criteria JSONB NOT NULL DEFAULT '{}',
    is_active BOOLEAN NOT NULL DEFAULT true,
    mode TEXT NOT NULL DEFAULT 'exit' CHECK (mode IN ('exit', 'measure')),
    conversion_window_seconds INTEGER CHECK (conversion_window_seconds > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_by UUID REFERENCES users(id),
    deleted_at TIMESTAMPTZ
);
-- The SPEC's uq_workflow_goal, for goals that are not deleted (so a deleted goal can be
-- created again).
CREATE UNIQUE INDEX uq_workflow_goal
    ON workflow_goals(workflow_id, goal_type, criteria) WHERE deleted_at IS NULL;

CREATE INDEX idx_workflow_goals_workflow ON workflow_goals(workflow_id);
CREATE INDEX idx_workflow_goals_tenant ON workflow_goals(tenant_id);
CREATE INDEX idx_workflow_goals_active ON workflow_goals(is_active) WHERE is_active = true;

CREATE TABLE workflow_goal_achievements (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    workflow_id UUID NOT NULL REFERENCES workflows(id),
    workflow_enrollment_id UUID NOT NULL REFERENCES workflow_enrollments(id),
    contact_id UUID NOT NULL REFERENCES contacts(id),
    goal_config_id UUID NOT NULL REFERENCES workflow_goals(id),
    tenant_id UUID NOT NULL REFERENCES tenants(id),
    goal_type goal_type NOT NULL,
    achieved_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    trigger_event JSONB,
    metadata JSONB DEFAULT '{}',

    CONSTRAINT uq_achievement UNIQUE (workflow_enrollment_id, goal_config_id)
);

CREATE INDEX idx_achievements_workflow ON workflow_goal_achievements(workflow_id);
CREATE INDEX idx_achievements_contact ON workflow_goal_achievements(contact_id);
CREATE INDEX idx_achievements_date ON workflow_goal_achievements(achieved_at);
CREATE INDEX idx_achievements_tenant ON workflow_goal_achievements(tenant_id);
CREATE INDEX idx_achievements_goal ON workflow_goal_achievements(goal_config_id);

CREATE TRIGGER update_workflow_goals_updated_at
    BEFORE UPDATE ON workflow_goals
    FOR EACH ROW
    EXECUTE FUNCTION update_updated_at_column();

-- Row-level security (SPEC risk 4). The worker connects as the tables' owner and is not subject
-- to it; the admin API's sessions are (see the API role migration).
ALTER TABLE workflow_goals ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_goal_achievements ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation_goals ON workflow_goals
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);

CREATE POLICY tenant_isolation_achievements ON workflow_goal_achievements
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
