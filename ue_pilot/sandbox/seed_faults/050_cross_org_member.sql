-- A faulty seed script: it adds a member to another org (org_sandbox0001), as a
-- script copied from another pilot without changing the org would. Row-level
-- security rejects the row because its org differs from the tenant context.
INSERT INTO members (id, org_id, full_name, email, role)
VALUES ('org_sandbox0001:m99', 'org_sandbox0001', 'Copied Steward',
        'copied@org-sandbox0001.example.org', 'member');
