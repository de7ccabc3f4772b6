-- The admin API's database role, and row-level security on every table that holds a tenant's rows.
--
-- The API connects as the tables' owner (like the worker, which RLS does not restrict), and each
-- request's transaction switches to `goalstream_api`, a role that does not own the tables and so is
-- subject to the policies, with `app.tenant_id` set to the caller's tenant. A query in API code
-- that forgets its `WHERE tenant_id = ...` still sees only the caller's rows.

-- Roles are cluster-wide: another database of the same cluster may have created it already, maybe
-- at this very moment.
DO $$
BEGIN
    CREATE ROLE goalstream_api NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END;
$$;

-- The connecting role must be allowed to `SET ROLE goalstream_api` (a superuser always is).
DO $$
BEGIN
    EXECUTE format('GRANT goalstream_api TO %I', current_user);
EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
    RAISE NOTICE 'could not grant goalstream_api to %; grant it as a superuser', current_user;
END;
$$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflows ENABLE ROW LEVEL SECURITY;
ALTER TABLE contacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_enrollments ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_pending_actions ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation_tenants ON tenants
    FOR ALL USING (id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_users ON users
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_workflows ON workflows
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_contacts ON contacts
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_enrollments ON workflow_enrollments
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_pending_actions ON workflow_pending_actions
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation_api_keys ON api_keys
    FOR ALL USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid);

-- What the API may do: read the platform's rows, and create and change goals (deleting a goal
-- sets `deleted_at`, so no DELETE). The key table stays out of reach: keys are checked before
-- the role is taken.
GRANT SELECT ON tenants, users, workflows, contacts, workflow_enrollments,
    workflow_pending_actions, workflow_goal_achievements TO goalstream_api;
GRANT SELECT, INSERT, UPDATE ON workflow_goals TO goalstream_api;
