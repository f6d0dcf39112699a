-- Keeps a marker bucket findable and expiring, after `commit_watched` (in
-- src/projection/store.rs) added event ids to it in the same MULTI/EXEC:
-- the same bookkeeping as the end of commit.lua. The bucket (and its
-- index) only ever get a later expiry, never an earlier one.
--
-- ARGV[1] = bucket set key; ARGV[2] = bucket index key (a sorted set:
-- bucket key -> its expiry; see seen.lua); ARGV[3] = now (unix seconds);
-- ARGV[4] = when the bucket expires

local bucket, index = ARGV[1], ARGV[2]
local now, expiry = tonumber(ARGV[3]), tonumber(ARGV[4])
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
