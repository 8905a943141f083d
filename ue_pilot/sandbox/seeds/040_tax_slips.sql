-- One T4A slip per member for the pilot's first tax year.
INSERT INTO tax_slips (id, org_id, member_id, tax_year, amount, sin_last3)
SELECT current_setting('ue_pilot.org_id') || ':t0' || n,
       current_setting('ue_pilot.org_id'),
       current_setting('ue_pilot.org_id') || ':m0' || n,
       2025,
       100.00 * n,
       lpad((100 * n + 7)::text, 3, '0')
FROM generate_series(1, 3) AS n;
