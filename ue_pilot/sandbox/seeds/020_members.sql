-- The pilot's first stewards: an owner, an admin and a member.
INSERT INTO members (id, org_id, full_name, email, role)
SELECT current_setting('ue_pilot.org_id') || ':m0' || n,
       current_setting('ue_pilot.org_id'),
       (ARRAY['Pilot Owner', 'Pilot Admin', 'Pilot Member'])[n],
       (ARRAY['owner', 'admin', 'member'])[n] || '@'
           || current_setting('ue_pilot.org_slug') || '.example.org',
       (ARRAY['owner', 'admin', 'member'])[n]
FROM generate_series(1, 3) AS n;
