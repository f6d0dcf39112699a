-- Writes a batch's folded entities, each only if nobody wrote it since the
-- processor read it (compare-and-set on the entity's `~rev`), together with
-- the idempotency markers of the events folded into it. The merge itself
-- happens in the processor (src/projection/fold.rs); this script only makes
-- "still as read? then write state and markers" one atomic step.
--
-- ARGV[1] = current version pointer key (absent = version 1)
-- ARGV[2] = building version pointer key
-- ARGV[3] = "1": live apply, check the pointers; "": a rebuild's own version
-- ARGV[4] = current version as read (a rebuild: its own version);
--   ARGV[5] = building version as read or ""
-- ARGV[6] = the projection's write counter; ARGV[7] = this writer's own
--   write counter (see `WriteCounts` in src/projection/store/mod.rs)
-- ARGV[8] = number of marker sets S (one per version written), then S
--   pairs: the marker bucket's set key, the version's stripe counter key
--   prefix
-- then groups, each: entity hash key, expected `~rev` ("0" = absent), marker
--   set number (1..S), the entity's write stripe, marker count, the event
--   ids, field count, then field, value pairs (the new `~rev` among them)
-- Returns -1 when a rebuild switched versions since the read, or, for a
-- rebuild's own writes, when its version is no longer the one being built
-- (nothing written), else one flag per group: 0 written, 1 changed
-- meanwhile (not written; the processor re-reads and folds it again).
--
-- Keys are built by the processor from the pointers it read, and checked
-- here against the pointers in the same atomic step, so a rebuild's switch
-- never interleaves with an apply. They share the projection's hash tag.
-- The processor sends this script in a MULTI/EXEC followed by markers.lua,
-- which keeps each bucket findable and expiring.

if ARGV[3] == '1' then
  local current = redis.call('GET', ARGV[1]) or '1'
  local building = redis.call('GET', ARGV[2]) or ''
  if building == current then building = '' end
  if current ~= ARGV[4] or building ~= ARGV[5] then
    return -1
  end
elseif redis.call('GET', ARGV[2]) ~= ARGV[4] then
  -- A rebuild writes its version only while that version is the one being
  -- built: a write still on its way when a failed rebuild removed its
  -- partial version lands nowhere.
  return -1
end

-- Both counters move with every call that may write, in the same atomic
-- step: a reader of both can tell whether anyone else wrote since.
redis.call('INCR', ARGV[6])
redis.call('INCR', ARGV[7])
redis.call('EXPIRE', ARGV[7], 86400)

local sets = tonumber(ARGV[8])
local marked = {}
for s = 1, sets do marked[s] = {} end
local result = {}
-- The stripe counters this call bumps: each once, whatever its writes.
local stripes = {}
local a = 9 + 2 * sets
while a <= #ARGV do
  local key, expected = ARGV[a], ARGV[a + 1]
  local set = tonumber(ARGV[a + 2])
  local stripe = ARGV[a + 3]
  local markers = tonumber(ARGV[a + 4])
  local first_marker = a + 5
  local nfields = tonumber(ARGV[first_marker + markers])
  local first_field = first_marker + markers + 1
  local next_group = first_field + 2 * nfields
  if (redis.call('HGET', key, '~rev') or '0') == expected then
    local ids = marked[set]
    for m = first_marker, first_marker + markers - 1 do
      ids[#ids + 1] = ARGV[m]
    end
    if nfields > 0 then
      redis.call('HSET', key, unpack(ARGV, first_field, next_group - 1))
    end
    stripes[ARGV[8 + 2 * set] .. stripe] = true
    result[#result + 1] = 0
  else
    result[#result + 1] = 1
  end
  a = next_group
end

-- Every write of an entity bumps its stripe's counter: a watched apply
-- (`commit_watched` in src/projection/store/commit.rs) that read the entity
-- before this write then does not run.
for stripe in pairs(stripes) do
  redis.call('INCR', stripe)
end
-- One SADD per marker set for the whole call (markers.lua, next in the
-- same transaction, sees to the bucket's expiry and index).
for s = 1, sets do
  local ids = marked[s]
  if #ids > 0 then
    local bucket = ARGV[7 + 2 * s]
    for first = 1, #ids, 1000 do
      redis.call('SADD', bucket, unpack(ids, first, math.min(first + 999, #ids)))
    end
  end
end
return result
