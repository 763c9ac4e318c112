-- "What changed since the last release?" for analysts: abc_reader reads the stored release diff
-- (etl/diff.py; abc.release_diff_item) of the newest published release through this view only.
-- old_release is the release it was compared with (the newest older one loaded, or the one an operator
-- asked for). No row: nothing changed in scope, or no diff is stored yet (abc.release_diff).
CREATE VIEW abc.current_release_change AS
SELECT i.old_release, i.new_release, i.dataset, i.subject, i.change, i.item, i.old_value, i.new_value
FROM abc.release_diff_item i
WHERE i.new_release = (SELECT release FROM abc.current_release);
COMMENT ON VIEW abc.current_release_change IS
    'Items of the stored diffs of the newest published release: subject (file, directory, cell, cluster, gene), change, old and new value.';

GRANT SELECT ON abc.current_release_change TO abc_reader;
