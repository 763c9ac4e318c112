-- The real consensus cluster_to_cluster_annotation_membership.csv has no colour column: each term's
-- color_hex_triplet lives in cluster_annotation_term.csv. abc.cluster_taxonomy takes the membership
-- row's colour when a file has one (older layouts) and the term's otherwise; same columns as before.
CREATE OR REPLACE VIEW abc.cluster_taxonomy AS
SELECT m.release, m.cluster_alias,
       max(m.cluster_annotation_term_label) FILTER (WHERE m.cluster_annotation_term_set_name = 'neighborhood')
           AS neighborhood_label,
       max(m.cluster_annotation_term_name) FILTER (WHERE m.cluster_annotation_term_set_name = 'neighborhood')
           AS neighborhood_name,
       max(m.cluster_annotation_term_label) FILTER (WHERE m.cluster_annotation_term_set_name = 'class')
           AS class_label,
       max(m.cluster_annotation_term_name) FILTER (WHERE m.cluster_annotation_term_set_name = 'class')
           AS class_name,
       max(coalesce(m.color_hex_triplet, t.color_hex_triplet))
           FILTER (WHERE m.cluster_annotation_term_set_name = 'class') AS class_color,
       max(m.cluster_annotation_term_label) FILTER (WHERE m.cluster_annotation_term_set_name = 'subclass')
           AS subclass_label,
       max(m.cluster_annotation_term_name) FILTER (WHERE m.cluster_annotation_term_set_name = 'subclass')
           AS subclass_name,
       max(coalesce(m.color_hex_triplet, t.color_hex_triplet))
           FILTER (WHERE m.cluster_annotation_term_set_name = 'subclass') AS subclass_color,
       max(m.cluster_annotation_term_label) FILTER (WHERE m.cluster_annotation_term_set_name = 'supertype')
           AS supertype_label,
       max(m.cluster_annotation_term_name) FILTER (WHERE m.cluster_annotation_term_set_name = 'supertype')
           AS supertype_name,
       max(coalesce(m.color_hex_triplet, t.color_hex_triplet))
           FILTER (WHERE m.cluster_annotation_term_set_name = 'supertype') AS supertype_color,
       max(m.cluster_annotation_term_label) FILTER (WHERE m.cluster_annotation_term_set_name = 'cluster')
           AS cluster_label,
       max(m.cluster_annotation_term_name) FILTER (WHERE m.cluster_annotation_term_set_name = 'cluster')
           AS cluster_name,
       max(coalesce(m.color_hex_triplet, t.color_hex_triplet))
           FILTER (WHERE m.cluster_annotation_term_set_name = 'cluster') AS cluster_color
FROM abc.cluster_membership m
LEFT JOIN abc.cluster_annotation_term t ON t.release = m.release AND t.label = m.cluster_annotation_term_label
GROUP BY m.release, m.cluster_alias;
