-- Tansu 0.6's sqlite schema has no index on record headers, so each fetched
-- record scans every header of every topic (O(N²) consumption). Applied by
-- deploy/local/stack.sh and the test harness once the broker created its
-- schema; see docs/processor.md, "Tansu".
create index if not exists header_topition_offset on header (topition, offset_id);
