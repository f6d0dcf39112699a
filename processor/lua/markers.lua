-- Keeps a marker bucket findable and expiring. Both write paths in
-- src/projection/store/commit.rs (`commit_watched`, and `commit_scripted` after
-- commit.lua) run it in the same MULTI/EXEC that added event ids to the
-- bucket. The bucket (and its index) only ever get a later expiry, never an
-- earlier one.
--
-- ARGV[1] = bucket set key; ARGV[2] = bucket index key (a sorted set:
-- bucket key -> its expiry; see seen.lua); ARGV[3] = now (unix seconds);
-- ARGV[4] = when the bucket expires

local bucket, index = ARGV[1], ARGV[2]
local now, expiry = tonumber(ARGV[3]), tonumber(ARGV[4])
-- No bucket: commit.lua wrote no marker (e.g. it refused a write into a
-- version being removed); index nothing.
if redis.call('EXISTS', bucket) == 0 then return 0 end
local function expire_at_least(key)
  if redis.call('TTL', key) < expiry - now then
    redis.call('EXPIREAT', key, expiry)
  end
end
expire_at_least(bucket)
redis.call('ZADD', index, 'GT', expiry, bucket)
redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. now)
expire_at_least(index)
return 0
