-- Which of the given event ids a projection version has already applied.
--
-- The markers live in time-bucketed sets (one per `bucket_secs` of wall
-- clock), each expiring `dedup_window_secs` after its bucket ends, and an
-- index (sorted set: bucket key -> expiry) lists them, so buckets written
-- under another window or bucket width are still found.
--
-- ARGV[1] = index key; ARGV[2] = now (unix seconds); ARGV[3..] = event ids
-- Returns one flag per id: 1 seen, 0 not.

local buckets = redis.call('ZRANGEBYSCORE', ARGV[1], ARGV[2], '+inf')
local n = #ARGV - 2
local seen = {}
for i = 1, n do seen[i] = 0 end
for _, bucket in ipairs(buckets) do
  local flags = redis.call('SMISMEMBER', bucket, unpack(ARGV, 3))
  for i = 1, n do
    if flags[i] == 1 then seen[i] = 1 end
  end
end
return seen
