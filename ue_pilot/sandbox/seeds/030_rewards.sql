-- Opening rewards, so the export routes have rows to serve.
INSERT INTO rewards (id, org_id, member_id, points, description, awarded_at)
SELECT current_setting('ue_pilot.org_id') || ':r00' || n,
       current_setting('ue_pilot.org_id'),
       current_setting('ue_pilot.org_id') || ':m0' || (1 + mod(n - 1, 3)),
       50 * n,
       'Pilot onboarding',
       timestamptz '2026-01-05 00:00+00' + n * interval '1 day'
FROM generate_series(1, 3) AS n;
