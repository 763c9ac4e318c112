-- Analysts (abc_reader) read the aggregated expression views as they read the metadata views.
GRANT SELECT ON abc.expression_by_gene, abc.expression_profile,
    abc.expression_by_cluster, abc.expression_by_supertype, abc.expression_by_subclass, abc.expression_by_class,
    abc.expression_by_region_subclass, abc.cluster_profile, abc.supertype_profile, abc.subclass_profile,
    abc.class_profile, abc.region_subclass_profile
    TO abc_reader;

-- The release pipeline announces each release it publishes (kind 'published').
ALTER TABLE abc.alert DROP CONSTRAINT alert_kind_check;
ALTER TABLE abc.alert ADD CONSTRAINT alert_kind_check
    CHECK (kind IN ('new_release', 'published', 'failed_run', 'failed_check', 'lag'));
