-- The org's row in the platform's organization list, which has no row-level
-- security. The onboarding flow sets ue_pilot.org_id, ue_pilot.org_name and
-- ue_pilot.org_slug, and the tenant setting, for the transaction.
INSERT INTO organizations (id, name, status)
VALUES (current_setting('ue_pilot.org_id'), current_setting('ue_pilot.org_name'), 'active')
ON CONFLICT (id) DO NOTHING;
